"""A small client for `reco serve`, on the standard library only (it runs wherever Python does).

    from app.serve.client import RecoClient
    c = RecoClient("http://127.0.0.1:8000", token=None)
    c.search(text="a red circle", k=5)["hits"]
    c.classify(["photo.jpg"], ["cedar waxwing", "bohemian waxwing"], compare=True)["results"]
    c.embed(images=["photo.jpg"], texts=["a bird"])["images"][0]["embedding"]

    python -m app.serve.client --url http://127.0.0.1:8000 --wait 60 search --text "a red circle" -k 3
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ClientError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def _b64(image) -> str:
    """A path, bytes or a PIL image -> base64."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    return base64.b64encode(data).decode()


class RecoClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 60.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            raise ClientError(exc.code, message) from None

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._call("GET", "/readyz")
            except (ClientError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.url} not ready after {timeout:.0f} s: {exc}") from None
                time.sleep(0.25)

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models")["models"]

    def memories(self) -> list[dict]:
        return self._call("GET", "/v1/memories")["memories"]

    def embed(self, images=(), texts=(), *, refine_image: bool = True, refine_text: bool = True,
              frozen: bool = False, model: str | None = None) -> dict:
        return self._call("POST", "/v1/embed", {"images": [_b64(i) for i in images], "texts": list(texts),
                                                "refine_image": refine_image, "refine_text": refine_text,
                                                "frozen": frozen, "model": model})

    def classify(self, images, classes, *, templates=None, top_k: int = 5, compare: bool = False,
                 model: str | None = None) -> dict:
        return self._call("POST", "/v1/classify", {"images": [_b64(i) for i in images], "classes": list(classes),
                                                   "templates": templates, "top_k": top_k, "compare": compare,
                                                   "model": model})

    def search(self, text: str | None = None, image=None, *, k: int = 10, memory: str | None = None,
               model: str | None = None) -> dict:
        return self._call("POST", "/v1/search", {"text": text, "images": [_b64(image)] if image is not None else [],
                                                 "k": k, "memory": memory, "model": model})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.serve.client", description="Call a running `reco serve`.")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--token", default=None, help="bearer token (RECO_API_TOKEN of the server)")
    p.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for /readyz first")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("search", help="nearest memory items of a text or an image")
    s.add_argument("--text")
    s.add_argument("--image")
    s.add_argument("-k", type=int, default=5)
    c = sub.add_parser("classify", help="zero-shot labels of images, frozen CLIP and RECO side by side")
    c.add_argument("images", nargs="+")
    c.add_argument("--classes", required=True, help="comma-separated class names")
    e = sub.add_parser("embed", help="refined embeddings of images and texts")
    e.add_argument("--image", action="append", default=[])
    e.add_argument("--text", action="append", default=[])
    args = p.parse_args(argv)
    client = RecoClient(args.url, args.token)
    try:
        if args.wait:
            client.wait_ready(args.wait)
        if args.what == "search":
            out = client.search(text=args.text, image=args.image, k=args.k)
            print(f"{out['memory']['name']} v{out['memory']['version']} ({out['query']} query)")
            for h in out["hits"]:
                print(f"  {h['score']:.3f}  {h['key']}  {h['caption']}")
        elif args.what == "classify":
            out = client.classify(args.images, [x.strip() for x in args.classes.split(",") if x.strip()],
                                  top_k=1, compare=True)
            for path, r in zip(args.images, out["results"]):
                print(f"{path}: frozen CLIP {r['baseline'][0]['label']!r}, RECO {r['reco'][0]['label']!r} "
                      f"(memory {out['memory']['name']} v{out['memory']['version']})")
        else:
            out = client.embed(images=args.image, texts=args.text)
            print(json.dumps({k: v for k, v in out.items() if k not in ("images", "texts")}))
            for side in ("images", "texts"):
                for row in out.get(side, []):
                    print(f"  {side[:-1]}: {len(row['embedding'])}-d, first values "
                          f"{[round(x, 4) for x in row['embedding'][:4]]}")
    except (ClientError, TimeoutError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
