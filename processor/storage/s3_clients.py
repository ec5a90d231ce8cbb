"""Which S3 client a bucket is opened with (``COMFYS3_S3_CLIENT``): obstore, the default, which
costs a third of botocore's CPU a request (``bench/s3_client_cost.py``, docs/s3-clients.md), or
aiobotocore, the house's long-standing one. Both honour the same
:class:`processor.storage.base.Storage` contract."""

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
            "the S3 client obstore (COMFYS3_S3_CLIENT, default obstore) is not installed, "
            "though comfys3 depends on it: pip install 'obstore==0.12.1', or set "
            "COMFYS3_S3_CLIENT=botocore"
        ) from None
    return ObstoreStorage(settings)
