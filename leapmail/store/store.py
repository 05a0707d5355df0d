"""The store as the reactor sees it: every call returns a Deferred, no call blocks.

One writer thread owns the only writing connection and commits queued jobs in groups
(see :class:`~leapmail.store.documents.Committer`); a Deferred fires only after the
commit — with ``synchronous=FULL``, after the fsync — so an acknowledged write survives
``kill -9``, and power loss on a disk that honours fsync.  Reads run on a small pool of threads, each with its own
read-only connection; WAL mode lets them proceed while the writer commits, and each read
job sees one consistent snapshot.
"""

import queue
import threading

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from leapmail.store import blobs
from leapmail.store.database import Database, classify
from leapmail.store.documents import Committer, Queries
from leapmail.store.errors import StoreClosed

#: Jobs committed together at most; bounds the work lost to one failed commit and the
#: latency a job waits behind others.
MAX_BATCH = 512
_STOP = object()


class Store:
    """An open store.  Create with :meth:`open` (blocking) or :meth:`open_deferred`."""

    _log = Logger()

    def __init__(self, database, reactor=None, readers=2):
        if reactor is None:
            from twisted.internet import reactor
        self.database = database
        self.path = database.path
        self._reactor = reactor
        self._indexers = database.indexers()
        self.cache = database.open_cache()
        self._jobs = queue.SimpleQueue()
        self._subscribers = []
        self._watchers = []
        self._closed = False
        self._closing = None
        self._writer = threading.Thread(
            target=self._write_loop, name="leapmail-store-writer", daemon=True
        )
        self._writer_ready = threading.Event()
        self._writer_error = None
        self._local = threading.local()
        self._reader_conns = []
        self._reader_conns_lock = threading.Lock()
        self._readpool = ThreadPool(minthreads=0, maxthreads=readers, name="leapmail-store-read")
        # Readers hold nothing that must be saved: a store left open must not keep the
        # process from exiting.
        self._readpool.threadFactory = _daemon_thread
        self._writer.start()
        self._writer_ready.wait()
        if self._writer_error is not None:
            self._readpool = None
            self.cache.close()
            raise self._writer_error
        self._readpool.start()

    @classmethod
    def open(cls, path, key, components=(), *, create=False, reactor=None, readers=2, **kw):
        """Open (or with ``create=True`` create) a store; raises a StoreError on bad files."""
        database = Database.open(path, key, components, create=create, **kw)
        try:
            return cls(database, reactor=reactor, readers=readers)
        except BaseException:
            database.close()
            raise

    @classmethod
    def open_deferred(cls, path, key, components=(), **kw):
        """:meth:`open` on a thread: validation and migration can take a while."""
        return threads.deferToThread(cls.open, path, key, components, **kw)

    # -- writing ---------------------------------------------------------------------

    def transact(self, fn, *args):
        """Run ``fn(txn, *args)`` atomically on the writer; fires with its result once durable.

        ``txn`` is a :class:`~leapmail.store.documents.Transaction`.  If ``fn`` raises,
        none of its writes happen and the Deferred fails with that exception.
        """
        if self._closed:
            return defer.fail(StoreClosed(self.path))
        d = defer.Deferred()
        self._jobs.put((fn, args, d))
        return d

    def put(self, doc_id, kind, content, expected_rev=None):
        return self.transact(lambda txn: txn.put(doc_id, kind, content, expected_rev))

    def delete(self, doc_id, expected_rev=None):
        return self.transact(lambda txn: txn.delete(doc_id, expected_rev))

    def put_many(self, docs):
        """Write ``(id, kind, content)`` triples in one transaction."""
        return self.transact(lambda txn: [txn.put(i, k, c) for i, k, c in docs])

    def _write_loop(self):
        try:
            conn = self.database.connect()
            committer = Committer(conn, self.path, self._indexers, self._classify, self.cache)
        except Exception as e:
            self._writer_error = e
            self._writer_ready.set()
            return
        self._writer_ready.set()
        stopping = None
        while stopping is None:
            job = self._jobs.get()
            if job[0] is _STOP:
                stopping = job
                break
            batch = [job]
            while len(batch) < MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job[0] is _STOP:
                    stopping = job
                    break
                batch.append(job)
            before = committer.counter.value
            outcomes = committer.run_batch([(fn, args) for fn, args, _ in batch])
            events = committer.events
            results = []
            for (_, _, d), (ok, value) in zip(batch, outcomes):
                if not ok:
                    value = Failure(value)
                    value.cleanFailure()
                results.append((d, ok, value))
            written = committer.counter.value if committer.counter.value != before else None
            self._reactor.callFromThread(self._deliver, events, results, written)
        try:
            # Fold the WAL back so a cleanly closed store is one self-contained file.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception:
            pass
        conn.close()
        self._reactor.callFromThread(stopping[2].callback, None)

    def subscribe(self, callback):
        """Call ``callback(events)`` on the reactor after each commit that emitted events.

        Subscribers hear of a commit before the callers of its jobs do, so a session
        has seen the consequences of its own command when the command completes.
        Returns a function that unsubscribes.
        """
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def watch(self, callback):
        """Call ``callback(generation)`` on the reactor after each commit that wrote.

        For sync, which replicates every document whatever its kind; the mail core's
        events (:meth:`subscribe`) say what writes meant.  Returns a function that
        stops the watching.
        """
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback)

    def _deliver(self, events, results, generation=None):
        if generation is not None:
            for callback in list(self._watchers):
                try:
                    callback(generation)
                except Exception:
                    self._log.failure("store generation watcher failed")
        if events:
            for callback in list(self._subscribers):
                try:
                    callback(events)
                except Exception:
                    self._log.failure("store event subscriber failed")
        for d, ok, value in results:
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def _classify(self, exc):
        if isinstance(exc, self.database.driver.Error):
            return classify(self.path, exc)
        return None

    # -- reading ---------------------------------------------------------------------

    def read(self, fn, *args):
        """Run ``fn(queries, *args)`` on a reader thread within one read transaction."""
        if self._closed:
            return defer.fail(StoreClosed(self.path))
        return threads.deferToThreadPool(self._reactor, self._readpool, self._run_read, fn, args)

    def _run_read(self, fn, args):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.database.connect(readonly=True)
            self._local.conn = conn
            with self._reader_conns_lock:
                self._reader_conns.append(conn)
        try:
            conn.execute("BEGIN")
            try:
                return fn(Queries(conn, self.path, self.cache), *args)
            finally:
                if conn.in_transaction:
                    # Ends the snapshot; a read transaction has nothing to commit, and
                    # after a driver error it may already be gone.
                    conn.execute("ROLLBACK")
        except self.database.driver.Error as e:
            raise classify(self.path, e) or e

    def get(self, doc_id, include_deleted=False):
        return self.read(lambda q: q.get(doc_id, include_deleted))

    def get_many(self, doc_ids, include_deleted=False):
        return self.read(lambda q: q.get_many(doc_ids, include_deleted))

    def changes_since(self, generation, limit=1000):
        return self.read(lambda q: q.changes_since(generation, limit))

    def generation(self):
        return self.read(lambda q: q.generation())

    # -- blobs -----------------------------------------------------------------------

    def blob_writer(self, blob_id=None):
        return blobs.BlobWriter(self, blob_id)

    @defer.inlineCallbacks
    def write_blob(self, source, blob_id=None):
        """Store the byte chunks of an iterable (e.g. a file read in pieces) as a blob."""
        writer = self.blob_writer(blob_id)
        try:
            for data in source:
                yield writer.write(data)
        except BaseException:
            yield writer.abort()
            raise
        info = yield writer.finish()
        return info

    @defer.inlineCallbacks
    def blob_reader(self, blob_id):
        info = yield self.read(blobs.info, blob_id)
        return blobs.BlobReader(self, info)

    def delete_blob(self, blob_id):
        return self.transact(blobs.delete_blob, blob_id)

    # -- closing ---------------------------------------------------------------------

    def close(self):
        """Finish queued writes, checkpoint, close connections, release the lock."""
        if self._closing is None:
            self._closed = True
            self._closing = self._shutdown()
        return _observe(self._closing)

    @defer.inlineCallbacks
    def _shutdown(self):
        stopped = defer.Deferred()
        try:
            # Readers first: read-only connections cannot fold the WAL back, so the
            # writer must be the last connection to close.
            yield threads.deferToThread(self._close_readers)
            self._jobs.put((_STOP, (), stopped))
            yield stopped
        finally:
            self.cache.close()
            self.database.close()

    def _close_readers(self):
        self._readpool.stop()
        with self._reader_conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()



def _daemon_thread(*args, **kwargs):
    return threading.Thread(*args, daemon=True, **kwargs)


def _observe(d):
    """A new Deferred with ``d``'s result, leaving ``d`` itself untouched for others."""
    observer = defer.Deferred()

    def relay(result):
        if isinstance(result, Failure):
            observer.errback(result)
            return None
        observer.callback(result)
        return result

    d.addBoth(relay)
    return observer
