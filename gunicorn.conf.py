"""gunicorn settings: `gunicorn -c gunicorn.conf.py wsgi:app`.

Workers: GATEWAY_WORKERS if set; else one gevent worker when a provider type that must
run in one process is configured (`single_worker`: local models, each worker would load its
own copies), else one per core. Key rest state is per worker unless server.redis shares it
(see README, "Operations and deployment" and "Running several instances")."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gateway.listen import listen_bind  # noqa: E402
from gateway.settings import ConfigError, load_settings  # noqa: E402
from providers import config_class  # noqa: E402

# Check the config in the master so a bad file stops the start with one line, at once.
try:
    _settings = load_settings(os.environ.get("GATEWAY_CONFIG"))
except ConfigError as _e:
    print(str(_e), file=sys.stderr)
    sys.exit(2)

bind = listen_bind(_settings)
# gunicorn's gevent worker plus deadlines for slow clients (server.client_header_timeout,
# client_body_timeout, keepalive_timeout): gateway/ops/gunicorn_worker.py.
worker_class = "gateway.ops.gunicorn_worker.DeadlineGeventWorker"


def _default_workers(settings) -> int:
    if any(config_class(p["type"]).single_worker for p in settings.providers.values()):
        return 1
    return os.cpu_count() or 1


workers = int(os.environ.get("GATEWAY_WORKERS") or _default_workers(_settings))
worker_connections = int(os.environ.get("GATEWAY_WORKER_CONNECTIONS", "4096"))
timeout = 0                 # streams may run long; gevent workers heartbeat on their own
graceful_timeout = int(os.environ.get("GATEWAY_GRACEFUL_TIMEOUT", "30"))
# On unless server.keepalive_timeout is 0; the worker enforces the exact idle time.
keepalive = int(_settings.keepalive_timeout + 0.999)
accesslog = None            # the app logs one line per request itself
errorlog = "-"
loglevel = os.environ.get("GATEWAY_LOG_LEVEL", "info")
preload_app = False         # never load models in the master before fork
# Recent gunicorn opens a control socket under ~/.gunicorn/; parallel instances (tests)
# must not share it.
# Set GATEWAY_CONTROL_SOCKET to a path to keep it.
if os.environ.get("GATEWAY_CONTROL_SOCKET"):
    control_socket = os.environ["GATEWAY_CONTROL_SOCKET"]
else:
    control_socket_disable = True

# Prometheus multiprocess mode when several workers serve /metrics, and a last flush of
# the usage log when a worker exits (gateway/ops/gunicorn_hooks.py).
from gateway.ops import gunicorn_hooks as _hooks  # noqa: E402


def on_starting(server):
    _hooks.on_starting(server)


def child_exit(server, worker):
    _hooks.child_exit(server, worker)


def on_exit(server):
    _hooks.on_exit(server)


def worker_exit(server, worker):
    _hooks.worker_exit(server, worker)
