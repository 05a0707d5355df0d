"""The Dovecot daemon the IMAP benchmark compares against: it serves, and it leaves nothing."""

import imaplib
import os

from dovecot import require_dovecot
from dovecot_server import DovecotServer, dovecot_peak_rss, session_pids
from mail_corpus import generated


def test_serves_byte_exact_and_stops_clean(tmp_path):
    require_dovecot()
    # imaplib turns every CR, LF and CRLF of an APPEND literal into CRLF, and Dovecot
    # does not keep NUL bytes: compare against what survives both.
    messages = [imaplib.MapCRLF.sub(imaplib.CRLF, raw) for _name, raw in generated(count=12, seed=7)
                if b"\0" not in raw][:6]
    server = DovecotServer(tmp_path / "dovecot")
    with server:
        master = server.process.pid
        maildir = server.maildir
        conn = imaplib.IMAP4(server.host, server.port)
        try:
            assert conn.login(server.user, server.password)[0] == "OK"
            for raw in messages:
                typ, data = conn.append("INBOX", None, None, raw)
                assert typ == "OK", data
            typ, data = conn.select("INBOX")
            assert (typ, data) == ("OK", [str(len(messages)).encode()])
            for seq, raw in enumerate(messages, 1):
                typ, data = conn.fetch(str(seq), "(BODY.PEEK[])")
                assert typ == "OK"
                assert data[0][1] == raw
            assert len(server.imap_pids()) == 1
            assert dovecot_peak_rss(server) > 0
        finally:
            conn.logout()
        assert server.pids()
    assert server.process is None
    assert session_pids(master) == []
    # As root the Maildir lives outside tmp_path, where nobody can reach it: removed.
    assert maildir.startswith(str(tmp_path)) or not os.path.exists(maildir)
