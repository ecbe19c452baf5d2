"""moto's server, answering one request at a time.

moto's DynamoDB checks a transaction's conditions and then applies it without a lock, so on
the threaded server two concurrent conditional writes can both succeed -- which real DynamoDB
never allows, and which our concurrency tests (one instance per tenant and environment,
exactly-once claims across replicas) depend on. Serving requests one at a time restores that
atomicity. Arguments are moto_server's (-H HOST -p PORT).
"""
import sys

import moto.server
from werkzeug.serving import run_simple as _run_simple


def _run_serially(*args, **kwargs):
    kwargs["threaded"] = False
    return _run_simple(*args, **kwargs)


moto.server.run_simple = _run_serially

if __name__ == "__main__":
    sys.exit(moto.server.main(sys.argv[1:]))
