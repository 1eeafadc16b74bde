"""obstore against s3fs as the loader's S3 client: `seis data bench` on one volume in a local S3 server (moto,
plain HTTP), both clients alternating, workers 0 and 2, two rounds; prints a table of decoded and fetched MiB/s.

    python benchmarks/s3_clients.py [--rounds 2] [--seconds 8]

moto is the ceiling here (pure Python, about one core), so the figure that carries over is the ratio of the two
clients measured in one run, not the absolute rates.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from seiscli.data.s3local import MotoS3

BUCKET = "bench-clients"
LINE = re.compile(r"([\d.]+) MiB/s decoded .*?; ([\d.]+) MiB/s")


def seis(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "seiscli", *args], capture_output=True, text=True, check=True)
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    server = MotoS3()
    try:
        server.create_bucket(BUCKET)
        uri, ep = f"s3://{BUCKET}/v.mdio", ["--endpoint-url", server.endpoint]
        seis("data", "synth", uri, "--shape", "256", "256", "384", "--chunks", "64", "64", "64", *ep)
        print("| round | client | workers | decoded MiB/s | fetched MiB/s |\n|---|---|---|---|---|")
        for r in range(args.rounds):
            for client in ("obstore", "s3fs"):
                for workers in ("0", "2"):
                    text = seis("data", "bench", uri, "--crop", "192", "192", "256", "--workers", workers,
                                "--concurrency", "64", "--prefetch", "4", "--client", client,
                                "--seconds", str(args.seconds), *ep)  # fmt: skip
                    m = LINE.search(text)
                    got = (m.group(1), m.group(2)) if m else ("?", "?")
                    print(f"| {r + 1} | {client} | {workers} | {got[0]} | {got[1]} |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
