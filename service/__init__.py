"""The source folder of callbridge, not a package: ``import callbridge`` instead.

Without this file, Python would import this folder as an empty namespace package
named ``service`` from a checkout's top directory, hiding the mistake.
"""

raise ImportError("service/ is callbridge's source folder; install it and `import callbridge`")
