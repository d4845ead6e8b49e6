"""The one place the version lives; metadata.txt and pyproject.toml are checked against it in tests."""

VERSION = "0.1.0"
