"""A receiver that answers 200 at once, keeping connections alive (for bench/relay.py).

    python3 relay_receiver.py PORT

Counts connections and requests, and writes them as JSON to the file named by
$RECEIVER_COUNTS on SIGTERM. One thread: the relay keeps one connection.
"""

import http.server
import json
import os
import signal
import sys

counts = {"connections": 0, "requests": 0}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def setup(self):
        super().setup()
        counts["connections"] += 1

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        counts["requests"] += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)

    def stop(*_args):
        with open(os.environ["RECEIVER_COUNTS"], "w") as file:
            json.dump(counts, file)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
