"""A local OpenAI-compatible chat completions server for the endpoint path of `caption`.

It listens on 127.0.0.1 (a free port), answers `POST /v1/chat/completions` with a caption that
says what it was sent (how many images, the first words of the prompt; ten times over for a
model whose name starts with "verbose"), records every request,
and is bounded: it stops itself after `max_requests` requests or `lifetime` seconds, whichever
comes first, so a failing test never leaves it running.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    def __init__(self, max_requests: int = 200, lifetime: float = 300.0) -> None:
        self.requests: list[dict] = []
        self.max_requests, self.deadline = max_requests, time.monotonic() + lifetime
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self.send_error(404, "only /v1/chat/completions")
                    return
                stub.requests.append(body)
                content = body["messages"][0]["content"]
                if isinstance(content, str):
                    text = f"merged by {body['model']}: " + " ".join(content.split()[-6:])
                else:
                    images = sum(part["type"] == "image_url" for part in content)
                    prompt = next(part["text"] for part in content if part["type"] == "text")
                    text = f"{body['model']} saw {images} images for " + " ".join(prompt.split()[:3])
                    if body["model"].startswith("verbose"):  # a detailed captioner: ~90 words
                        text = ", ".join([text] * 10)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if len(stub.requests) >= stub.max_requests:
                    threading.Thread(target=stub.server.shutdown, daemon=True).start()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.watchdog = threading.Timer(lifetime, self.server.shutdown)
        self.watchdog.daemon = True

    def __enter__(self) -> "StubServer":
        self.thread.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self.watchdog.cancel()
        self.server.shutdown()
        self.server.server_close()
