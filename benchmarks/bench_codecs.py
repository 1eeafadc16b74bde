"""Decode cost of the candidate compressors for the training layout: MiB of float32 decoded per core-second and
the stored ratio, on synthetic seismic (seiscli.data.synth) cut into inner chunks of the layout (32^3 by default).

    python benchmarks/bench_codecs.py [--shape 128 128 256] [--chunk 32 32 32] [--seconds 1.5]

One thread, CPU time (time.process_time), every chunk decoded into a fresh buffer as the loader does; the best
of three rounds per codec, because the machine is shared. Real seismic compresses worse than the synthetic
volume (MDIO's Volve figure: lossless 0.77 of raw); the ranking by decode cost is what carries over.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def codecs() -> dict[str, object]:
    from numcodecs import LZ4, Blosc, Zstd

    return {
        "none": None,
        "lz4 (numcodecs.lz4)": LZ4(acceleration=1),
        "zstd -1": Zstd(level=1),
        "zstd -3": Zstd(level=3),
        "blosc-lz4 noshuffle (MDIO 'lz4')": Blosc("lz4", 5, Blosc.NOSHUFFLE, blocksize=0),
        "blosc-lz4 shuffle": Blosc("lz4", 5, Blosc.SHUFFLE, blocksize=0),
        "blosc-zstd noshuffle (MDIO default)": Blosc("zstd", 5, Blosc.NOSHUFFLE, blocksize=0),
        "blosc-zstd shuffle": Blosc("zstd", 5, Blosc.SHUFFLE, blocksize=0),
        "blosc-zstd-1 bitshuffle": Blosc("zstd", 1, Blosc.BITSHUFFLE, blocksize=0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 128, 256))
    ap.add_argument("--chunk", type=int, nargs=3, default=(32, 32, 32))
    ap.add_argument("--seconds", type=float, default=1.5)
    args = ap.parse_args()
    from numcodecs import blosc

    blosc.set_nthreads(1)  # one core: the loader runs one decode per worker thread
    from seiscli.data.synth import synthetic_volume

    vol = synthetic_volume(tuple(args.shape), seed=1)
    c = args.chunk
    chunks = [
        np.ascontiguousarray(vol[i : i + c[0], j : j + c[1], k : k + c[2]])
        for i in range(0, vol.shape[0], c[0])
        for j in range(0, vol.shape[1], c[1])
        for k in range(0, vol.shape[2], c[2])
    ]
    raw = sum(x.nbytes for x in chunks)
    print("| codec | stored / raw | decode MiB/s per core | encode MiB/s per core |\n|---|---|---|---|")
    for name, codec in codecs().items():
        if codec is None:
            enc = [x.tobytes() for x in chunks]
            t0 = time.process_time()
            for _ in range(20):
                for b in enc:
                    np.frombuffer(b, dtype=np.float32).copy()
            best_dec = 20 * raw / (time.process_time() - t0) / 2**20
            print(f"| {name} (a copy) | 1.000 | {best_dec:,.0f} | - |", flush=True)
            continue
        t0 = time.process_time()
        enc = [codec.encode(x) for x in chunks]
        enc_rate = raw / (time.process_time() - t0) / 2**20
        stored = sum(len(e) for e in enc)
        rates = []
        for _ in range(3):
            n, t0 = 0, time.process_time()
            while time.process_time() - t0 < args.seconds / 3:
                for e in enc:
                    np.frombuffer(codec.decode(e), dtype=np.float32)
                n += 1
            rates.append(n * raw / (time.process_time() - t0) / 2**20)
        print(f"| {name} | {stored / raw:.3f} | {max(rates):,.0f} | {enc_rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
