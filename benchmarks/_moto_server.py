"""moto's S3 over HTTP in a process of its own (so its work never competes with the client's for
one interpreter lock), optionally answering each request `--latency` seconds late, as S3 does
(15-30 ms to the first byte). Prints its port, then serves until killed.

    python -m benchmarks._moto_server --latency 0.02
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


class SlowMotoServer(ThreadedMotoServer):
    def __init__(self, latency: float) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.latency = latency

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def slow(environ: dict[str, Any], start_response: Any) -> Any:
            time.sleep(self.latency)
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, slow, threaded=True)
        self._server_ready_event.set()
        self._server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = SlowMotoServer(args.latency)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
