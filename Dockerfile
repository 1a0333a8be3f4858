# syntax=docker/dockerfile:1
#
# callbridge container image.
#
#   docker build -t callbridge:0.1.0 .
#   docker run --rm -p 8080:8080 -v "$PWD/config.yaml:/etc/callbridge/config.yaml:ro" callbridge:0.1.0
#
# Two stages: the builder resolves and installs every dependency into a virtualenv at
# /opt/venv; the runtime stage copies only that virtualenv onto a clean base, so no
# build dependency, pip cache or source tree ships. Both stages use the same base image, so the
# virtualenv's interpreter symlink (/usr/local/bin/python3.11) resolves in the runtime.

# --- builder -------------------------------------------------------------------------
# Base pinned to a patch release on Debian bookworm; both stages must use the same tag.
# Written out (not an ARG) so hadolint can check the pin.
FROM python:3.11.14-slim-bookworm AS builder

# Bytecode is compiled here, at install time: the runtime's root filesystem is
# read-only, so the interpreter could not write it later.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependency layer: it depends on pyproject.toml alone, so editing the code reuses it.
# The requirement list is read from [project].dependencies (no second list to drift).
COPY pyproject.toml ./
RUN python -c "import pathlib, tomllib; \
deps = tomllib.loads(pathlib.Path('pyproject.toml').read_text())['project']['dependencies']; \
pathlib.Path('requirements.txt').write_text('\n'.join(deps) + '\n')" \
 && pip install --no-cache-dir --requirement requirements.txt

# The package itself, without touching the dependencies installed above (README.md is
# the package's long description, which pyproject.toml names).
COPY README.md ./
COPY service/ service/
RUN pip install --no-cache-dir --no-deps . \
 && callbridge --help > /dev/null

# --- runtime -------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="callbridge" \
      org.opencontainers.image.description="Turns a voice-AI call platform's polling API into real-time, signed webhooks (Standard Webhooks)." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A fixed uid/gid (10001) so Kubernetes can check runAsNonRoot and the chart can pin
# runAsUser. /var/lib/callbridge is the embedded Redis data dir (single-replica dev mode;
# the Helm chart always points at an external Redis). The config default
# redis.data_dir is the relative ".callbridge/redis", so /app/.callbridge links there:
# the default works from WORKDIR /app while /app itself stays read-only.
RUN groupadd --system --gid 10001 callbridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin callbridge \
 && install --directory --owner=10001 --group=10001 --mode=0750 /var/lib/callbridge \
 && install --directory --mode=0755 /app /etc/callbridge \
 && ln -s /var/lib/callbridge /app/.callbridge

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

EXPOSE 8080

# No curl in slim images: the interpreter is the probe. urlopen raises on any non-2xx
# answer or connection error, which exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["callbridge"]
CMD ["run", "--config", "/etc/callbridge/config.yaml"]
