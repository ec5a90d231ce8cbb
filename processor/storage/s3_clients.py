"""Which S3 client a bucket is opened with (``COMFYS3_S3_CLIENT``): aiobotocore, the default,
or obstore, an extra that costs a third of botocore's CPU a request (``bench/s3_client_cost.py``,
docs/s3-clients.md). Both honour the same :class:`processor.storage.base.Storage` contract."""

from __future__ import annotations

from processor.errors import SettingsError
from processor.settings import S3Settings
from processor.storage.base import Storage
from processor.storage.s3 import S3Storage


def s3_storage(settings: S3Settings) -> Storage:
    """An unopened storage for ``settings``' bucket, on the client its settings name."""
    if settings.client == "botocore":
        return S3Storage(settings)
    try:
        from processor.storage.obstore_s3 import ObstoreStorage
    except ModuleNotFoundError as error:
        if error.name != "obstore":
            raise
        raise SettingsError(
            "COMFYS3_S3_CLIENT=obstore needs the obstore package: "
            "pip install 'comfys3[obstore]' (or set COMFYS3_S3_CLIENT=botocore)"
        ) from None
    return ObstoreStorage(settings)
