"""How mail documents are encoded: CBOR.

Mail documents carry raw bytes (headers, MIME skeletons, bodies) beside structured
fields; CBOR holds both natively and compactly, where JSON would inflate every 8-bit
byte.  Canonical encoding keeps a document's bytes a function of its content.
"""

import cbor2


def dumps(value):
    return cbor2.dumps(value, canonical=True)


def loads(data):
    return cbor2.loads(data)
