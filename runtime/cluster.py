"""Ray's import paths into the cluster entry point (cli/cluster.py): Serve's proxies load
`runtime.cluster.proxy_middlewares` (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH), as README and
docs/kuberay-rayservice.yaml document it."""
from cli.cluster import ReplicaLost, proxy_middlewares  # noqa: F401
