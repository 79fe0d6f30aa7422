"""Data categories and the minimisation policy: what may be shared, for which purpose."""

from broker.catalog.errors import CatalogError, RecordInvalid
from broker.catalog.loader import Catalog, load_catalog
from broker.catalog.policy import Policy
from broker.catalog.schema import CategorySchema

__all__ = [
    "Catalog",
    "CatalogError",
    "CategorySchema",
    "Policy",
    "RecordInvalid",
    "load_catalog",
]
