"""The control plane of a node: gRPC (NodeService, grpc.health.v1, reflection), Prometheus
metrics, and the `nbdfabric ctl` / `nbdfabric health` commands that talk to them.
"""
