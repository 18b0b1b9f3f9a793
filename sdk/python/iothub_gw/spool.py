"""The outbox's spool: accepted readings and the frames made of them, in
SQLite (docs/sdk.md, "The spool").

Tables: readings(rid, json, seq) - a reading, and the frame seq it was put
in (NULL: in no frame yet); meta(k, v) - next_seq; commands(id, last_ack) -
the last command_ack sent for each command id (duplicates run once, also
across restarts). A frame is assigned in one transaction (its readings' seq
column and next_seq), so after a crash every frame is resent with the seq and
readings it had; an ack deletes its rows. The fsync policy maps to SQLite's
`synchronous` in WAL mode: none = OFF, batch = NORMAL except for the
commit that assigns a frame (FULL: it syncs the WAL, and every reading
accepted before it, before the frame can be sent), always = FULL.
Thread-safe: one lock around the connection.
"""

import sqlite3
import threading
import time


class SpoolFull(Exception):
    """send() refused: the spool holds max_spool_bytes of unacked readings."""


SYNC = {"none": "OFF", "batch": "NORMAL", "always": "FULL"}


class Spool:
    def __init__(self, path, max_bytes=64 << 20, fsync="none"):
        if fsync not in SYNC:
            raise ValueError("fsync must be none, batch or always")
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=%s" % SYNC[fsync])
        self.db.execute("CREATE TABLE IF NOT EXISTS readings (rid INTEGER PRIMARY KEY AUTOINCREMENT,"
                        " json TEXT NOT NULL, seq INTEGER)")
        self.db.execute("CREATE INDEX IF NOT EXISTS readings_seq ON readings(seq)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS commands (n INTEGER PRIMARY KEY AUTOINCREMENT,"
                        " id TEXT UNIQUE NOT NULL, last_ack TEXT NOT NULL)")
        row = self.db.execute("SELECT v FROM meta WHERE k='next_seq'").fetchone()
        if row is None:
            # a new spool: seq from the clock stays above what a lost one used
            self.next_seq = int(time.time() * 1000)
            self.db.execute("INSERT INTO meta VALUES ('next_seq', ?)", (self.next_seq,))
        else:
            self.next_seq = row[0]
        # seqs below seq_limit may have been used by frames whose commit a power
        # cut took (synchronous OFF/NORMAL): start above them, never reuse one
        row = self.db.execute("SELECT v FROM meta WHERE k='seq_limit'").fetchone()
        if row is not None and row[0] > self.next_seq:
            self.next_seq = row[0]
        self.seq_limit = self.next_seq   # the first frame takes a new lease
        self.bytes = self.db.execute("SELECT COALESCE(SUM(LENGTH(json)), 0) FROM readings").fetchone()[0]

    def close(self):
        with self.lock:
            self.db.close()

    def append(self, text, bounded=True):
        with self.lock:
            if bounded and self.bytes + len(text) > self.max_bytes:
                raise SpoolFull("spool full: %d of %d bytes held by unacked readings"
                                % (self.bytes, self.max_bytes))
            self.db.execute("INSERT INTO readings (json) VALUES (?)", (text,))
            self.bytes += len(text)

    def pending(self):
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]

    def unframed(self):
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM readings WHERE seq IS NULL").fetchone()[0]

    def frames(self):
        """The seqs of the unacked frames, oldest first."""
        with self.lock:
            return [r[0] for r in self.db.execute(
                "SELECT DISTINCT seq FROM readings WHERE seq IS NOT NULL ORDER BY seq")]

    def make_frame(self, max_readings, max_bytes):
        """Puts up to max_readings unframed readings (max_bytes of JSON) in a
        new frame. Returns its seq, or None when there was nothing."""
        with self.lock:
            rows = self.db.execute("SELECT rid, LENGTH(json) FROM readings WHERE seq IS NULL"
                                   " ORDER BY rid LIMIT ?", (max_readings,)).fetchall()
            if not rows:
                return None
            take, size = [], 64
            for rid, n in rows:
                if take and size + n + 1 > max_bytes:
                    break
                take.append(rid)
                size += n + 1
            seq = self.next_seq
            lease = seq >= self.seq_limit
            if self.fsync == "batch" or lease:
                # the frame's seq must be on disk before the hub may store it:
                # this commit syncs the WAL, with every reading before it
                self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("UPDATE readings SET seq=? WHERE seq IS NULL AND rid BETWEEN ? AND ?",
                                (seq, take[0], take[-1]))
                self.db.execute("UPDATE meta SET v=? WHERE k='next_seq'", (seq + 1,))
                if lease:
                    self.db.execute("INSERT INTO meta VALUES ('seq_limit', ?) ON CONFLICT(k)"
                                    " DO UPDATE SET v=excluded.v", (seq + 1024,))
                self.db.execute("COMMIT")
                if lease:
                    self.seq_limit = seq + 1024
            except Exception:
                self.db.execute("ROLLBACK")
                raise
            finally:
                if self.fsync == "batch" or lease:
                    self.db.execute("PRAGMA synchronous=%s" % SYNC[self.fsync])
            self.next_seq = seq + 1
            return seq

    def frame(self, seq):
        with self.lock:
            return [r[0] for r in self.db.execute(
                "SELECT json FROM readings WHERE seq=? ORDER BY rid", (seq,))]

    def acked(self, seq, again=()):
        """Frame seq is done: its rows go; `again` (readings refused
        rate_limited) are appended anew in the same transaction."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                gone = self.db.execute("SELECT COALESCE(SUM(LENGTH(json)), 0) FROM readings WHERE seq=?",
                                       (seq,)).fetchone()[0]
                for text in again:
                    self.db.execute("INSERT INTO readings (json) VALUES (?)", (text,))
                self.db.execute("DELETE FROM readings WHERE seq=?", (seq,))
                self.db.execute("COMMIT")
            except Exception:
                self.db.execute("ROLLBACK")
                raise
            self.bytes += sum(len(t) for t in again) - gone

    # commands
    def command_ack(self, cid):
        with self.lock:
            r = self.db.execute("SELECT last_ack FROM commands WHERE id=?", (cid,)).fetchone()
            return r[0] if r else None

    def set_command_ack(self, cid, text, keep=1024):
        with self.lock:
            self.db.execute("INSERT INTO commands (id, last_ack) VALUES (?, ?) ON CONFLICT(id)"
                            " DO UPDATE SET last_ack=excluded.last_ack", (cid, text))
            self.db.execute("DELETE FROM commands WHERE n <= (SELECT MAX(n) FROM commands) - ?", (keep,))
