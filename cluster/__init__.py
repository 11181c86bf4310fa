"""Cluster operations: job submission over the Ray Jobs API, authentication, cluster configs."""
