"""Open a store, say so on stdout, and keep it open until stdin closes."""

import sys

from leapmail.store import Database

db = Database.open(sys.argv[1], bytes.fromhex(sys.argv[2]), create=True)
print("ready", flush=True)
sys.stdin.read()
db.close()
