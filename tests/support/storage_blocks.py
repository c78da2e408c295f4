"""The agent's storage blocks pointing at the session's real servers (the
``moto`` and ``azurite`` fixtures of tests/conftest.py), shared by every
test file that stores into them. Stdlib only; Python 3.6+.

* ``BUCKET``: the S3 bucket moto_s3 creates; ``CONTAINER``: the Azure
  container the ``azurite`` fixture creates;
* ``s3_block(moto, **extra)``: an ``aws_storage`` block with moto's static
  keys, endpoint and region; ``azure_key_block(server, **extra)``: an
  ``azure_storage`` block with the account's Shared Key. In both, ``extra``
  overrides and a value None removes a key.
"""

__all__ = ["BUCKET", "CONTAINER", "s3_block", "azure_key_block"]

BUCKET = "snapshots"
CONTAINER = "snapshots"


def _block(block, extra):
    block.update(extra)
    return {k: v for k, v in block.items() if v is not None}


def s3_block(moto, **extra):
    """``aws_storage`` for moto (moto_s3.MotoServer) with its static keys."""
    return _block({"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
                   "s3_endpoint": moto.endpoint, "s3_region": "us-east-1", "s3_bucket": BUCKET},
                  extra)


def azure_key_block(server, **extra):
    """``azure_storage`` for Azurite (azurite.Azurite) with Shared Key."""
    return _block({"account_name": server.account, "account_key": server.key,
                   "container_name": CONTAINER, "endpoint": server.endpoint}, extra)
