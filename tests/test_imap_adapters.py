"""The mail core behind Twisted's IMAP interfaces: the adapters keep their contracts."""

import pytest_twisted
from twisted.mail import imap4, interfaces as imapi
from zope.interface.verify import verifyObject

from leapmail.imap.adapters import IMAPAccount, IMAPMailbox, IMAPMessage, MailboxInfo

RAW = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody text\r\n"


@pytest_twisted.ensureDeferred
async def test_adapters_provide_twisteds_interfaces_and_work(account):
    acct = IMAPAccount(account)
    verifyObject(imapi.IAccountIMAP, acct)
    verifyObject(imapi.INamespacePresenter, acct)
    assert await acct.create("Projects/2026") is True
    listed = await acct.listMailboxes("", "Projects*")
    assert [name for name, _ in listed] == ["Projects", "Projects/2026"]
    assert listed[0][1].getFlags() == ["\\HasChildren"]
    verifyObject(imapi.IMailboxIMAPInfo, listed[0][1])
    assert isinstance(listed[0][1], MailboxInfo)

    box = await acct.select("INBOX")
    for iface in (imapi.IMailboxIMAP, imapi.ISearchableIMAPMailbox, imapi.IMessageIMAPCopier,
                  imapi.IMailboxIMAPInfo, imapi.ICloseableMailboxIMAP):
        verifyObject(iface, box)
    assert isinstance(box, IMAPMailbox)
    uid = await box.addMessage(RAW, ["\\Flagged"])
    assert uid == 1
    box.view.updates()
    assert box.getMessageCount() == 1 and box.getUIDNext() == 2

    fetched = await box.fetch(imap4.MessageSet(1, 1), uid=False)
    assert len(fetched) == 1
    seq, message = fetched[0]
    verifyObject(imapi.IMessageIMAP, message)
    assert isinstance(message, IMAPMessage)
    assert seq == 1 and message.getUID() == 1 and message.getFlags() == ["\\Flagged"]
    assert message.getHeaders(False, "subject") == {"Subject": "hello"}
    assert message.getBodyFile().read() == b"body text\r\n"
    assert message.getSize() == len(RAW)

    changed = await box.store(imap4.MessageSet(1, 1), ["\\Deleted"], 1, uid=True)
    assert changed == {1: ["\\Flagged", "\\Deleted"]}
    assert await box.search(("flag", 8, True), uid=True) == [1]
    assert await box.expunge() == [1]
    await box.close()
