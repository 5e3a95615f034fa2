"""WSGI entry point for gunicorn: `gunicorn -c gunicorn.conf.py wsgi:app`.

GATEWAY_CONFIG names the YAML file (default config/gateway.yaml). gunicorn's gevent
worker monkey-patches before importing this module; patching here too keeps a plain
`import wsgi` cooperative (it must happen before anything imports ssl/socket)."""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

from app import create_app  # noqa: E402
from gateway.listen import listen_bind, split_bind  # noqa: E402
from gateway.settings import load_settings  # noqa: E402


def _bound_host(settings, env=os.environ) -> str:
    """The address gunicorn really listens on: the Host header guard applies only to
    loopback binds, as Ollama's does, so it must follow GATEWAY_BIND/GATEWAY_HOST (Docker
    sets 0.0.0.0) rather than the file's server.host."""
    return split_bind(listen_bind(settings, env))[0] or settings.host


_settings = load_settings(os.environ.get("GATEWAY_CONFIG"))
_settings.host = _bound_host(_settings)
app = create_app(_settings)
