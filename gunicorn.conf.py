"""gunicorn settings: `gunicorn -c gunicorn.conf.py wsgi:app`.

One gevent worker by default: each worker process would load its own copies of local
models and keep its own key rest state. With only remote providers, set
GATEWAY_WORKERS=<cores> (key rests are then per worker; see README)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gateway.settings import ConfigError, load_settings  # noqa: E402

# Check the config in the master so a bad file stops the start with one line, at once.
try:
    _settings = load_settings(os.environ.get("GATEWAY_CONFIG"))
except ConfigError as _e:
    print(str(_e), file=sys.stderr)
    sys.exit(2)

_host = os.environ.get("GATEWAY_HOST") or _settings.host
_port = os.environ.get("GATEWAY_PORT") or os.environ.get("PORT") or _settings.port
bind = os.environ.get("GATEWAY_BIND") or f"{_host}:{_port}"
worker_class = "gevent"
workers = int(os.environ.get("GATEWAY_WORKERS", "1"))
worker_connections = int(os.environ.get("GATEWAY_WORKER_CONNECTIONS", "4096"))
timeout = 0                 # streams may run long; gevent workers heartbeat on their own
graceful_timeout = int(os.environ.get("GATEWAY_GRACEFUL_TIMEOUT", "30"))
keepalive = 75
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
