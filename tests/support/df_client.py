"""A client process for the kill -9 tests: start or restore a SumOfSquares and run it.

Usage: python df_client.py ADDRESS CERT NAME start|restore N CHUNK DELAY
Prints "running" once the function is on the server, then a JSON line when it is done."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import dsage  # noqa: E402
from tests.support.functions import SumOfSquares  # noqa: E402


def main() -> None:
    address, cert, name, mode, n, chunk, delay = sys.argv[1:8]
    D = dsage.connect(address, cert=cert)
    if mode == "start":
        f = SumOfSquares(D, int(n), int(chunk), name, float(delay))
    else:
        f = dsage.DistributedFunction.restore(D, name)
    f.start()
    print("running", flush=True)
    result = f.wait(timeout=300)
    print(json.dumps({"result": result, "seen": f.seen}), flush=True)
    D.close()


if __name__ == "__main__":
    main()
