"""beam-curator: curate webdataset image datasets with Apache Beam."""

__version__ = "0.1.0"
