"""What the tests share: secrets, servers, settings, receivers, bridge processes."""
