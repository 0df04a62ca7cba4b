"""S3 settings for tests."""

# Fail fast against a closed port instead of botocore's default retries with back-off.
NO_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
