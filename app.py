"""Flask app factory and the development server.

    python app.py [--config FILE] [--host H] [--port P] [--bind H:P]
    python app.py --check-config [--config FILE]    # validate only: exit 0 or 1
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def create_app(settings=None):
    """Build everything from one Settings object (or a config path, or GATEWAY_CONFIG)."""
    from flask import Flask

    from gateway.errors import GatewayError, scrub
    from gateway.http import lifecycle, render
    from gateway.http.guard import Guard
    from gateway.http.anthropic_api import bp as anthropic_bp
    from gateway.http.ollama_api import bp as ollama_bp
    from gateway.http.openai_api import bp as openai_bp
    from gateway.http.responses_api import bp as responses_bp
    from gateway.settings import Settings, load_settings
    from gateway.state import GatewayState

    if not isinstance(settings, Settings):
        settings = load_settings(settings)
    configure_logging(settings.log_level)
    app = Flask(__name__)
    app.json.ensure_ascii = False
    app.url_map.strict_slashes = False
    state = GatewayState(settings)
    app.extensions["gateway"] = state
    guard = Guard(settings)
    lifecycle.install(app, state)        # first: a request the guard refuses has its record too
    app.register_blueprint(ollama_bp)
    app.register_blueprint(openai_bp)
    app.register_blueprint(anthropic_bp)
    app.register_blueprint(responses_bp)
    try:
        from gateway.ops import install as install_ops
    except ImportError:
        install_ops = None
    if install_ops is not None:
        install_ops(app, state)

    @app.before_request
    def _guard():
        guard.check_origin()
        pre = guard.preflight()
        if pre is not None:
            return pre
        guard.check_host_header()
        guard.check_auth()
        return None

    @app.after_request
    def _cors(resp):
        return guard.add_cors(resp)

    @app.errorhandler(GatewayError)
    def _gateway_error(e):
        return render.error(e)

    @app.errorhandler(404)
    def _not_found(e):
        return render.error(GatewayError(f"{scrub(render.path())} not found", status=404))

    @app.errorhandler(405)
    def _bad_method(e):
        return render.error(GatewayError(f"method {render.method()} not allowed for {render.path()}",
                                         status=405))

    @app.errorhandler(Exception)
    def _crash(e):
        from werkzeug.exceptions import HTTPException
        if isinstance(e, HTTPException):
            return render.error(GatewayError(e.description or e.name, status=e.code or 500))
        logging.getLogger("gateway").error("unhandled error on %s: %s", render.path(), scrub(repr(e)))
        return render.error(GatewayError(f"internal error: {type(e).__name__}", status=500))

    return app


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if getattr(configure_logging, "_done", False):
        return
    configure_logging._done = True
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))


def listen_address(args, settings, env=os.environ):
    """(host, port) for the development server, in gateway.listen's precedence."""
    from gateway.listen import listen_bind, split_bind
    bind = listen_bind(settings, env, getattr(args, "bind", None), getattr(args, "host", None),
                       getattr(args, "port", None))
    host, port = split_bind(bind)
    if host is None or port is None:
        raise SystemExit(f"the development server listens on HOST:PORT only, not {bind!r}: "
                         "run gunicorn for a unix socket")
    return host, port


def main(argv=None):
    from gevent import monkey
    monkey.patch_all()
    from gevent.pywsgi import WSGIServer

    from gateway.ops.client_deadlines import ClientTimeouts, deadline_handler
    from gateway.settings import ConfigError, load_settings

    ap = argparse.ArgumentParser(description="Ollama-compatible gateway (development server)")
    ap.add_argument("--config", help="YAML config (default: $GATEWAY_CONFIG or config/gateway.yaml)")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--bind", help="HOST:PORT")
    ap.add_argument("--check-config", action="store_true",
                    help="validate the config and exit (0: valid, 1: the error on stderr)")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1 if args.check_config else 2
    if args.check_config:
        print(f"config OK: {settings.file}")
        return 0
    settings.host, settings.port = listen_address(args, settings)
    app = create_app(settings)
    logging.getLogger("gateway").info("listening on http://%s:%d", settings.host, settings.port)
    server = WSGIServer((settings.host, settings.port), app, log=None, error_log=logging.getLogger("gevent"),
                        handler_class=deadline_handler(ClientTimeouts.of(settings)))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        app.extensions["gateway"].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
