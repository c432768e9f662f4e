"""KFP pipelines (DAGs) built from fedfm.components."""
