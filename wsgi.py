"""WSGI entry point for gunicorn: `gunicorn -c gunicorn.conf.py wsgi:app`.

GATEWAY_CONFIG names the YAML file (default config/gateway.yaml). gunicorn's gevent
worker monkey-patches before importing this module; patching here too keeps a plain
`import wsgi` cooperative (it must happen before anything imports ssl/socket)."""
from gevent import monkey

monkey.patch_all()

from app import create_app  # noqa: E402

app = create_app()
