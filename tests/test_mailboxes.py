"""Mailboxes: hierarchy, rename and delete rules, subscriptions, UIDVALIDITY."""

import pytest
import pytest_twisted

from leapmail.mail.account import Account
from leapmail.mail.errors import (
    CannotDeleteInbox,
    InvalidMailboxName,
    MailboxExists,
    NoSuchMailbox,
)
from leapmail.mail.schema import MAIL
from leapmail.store import Store


async def names_of(account):
    return [m.name for m in await account.mailboxes()]


@pytest_twisted.ensureDeferred
async def test_setup_creates_inbox_and_special_use(account):
    boxes = {m.name: m.role for m in await account.mailboxes()}
    assert boxes == {
        "INBOX": None, "Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash",
        "Junk": "\\Junk", "Archive": "\\Archive",
    }
    assert await account.subscriptions() == ["Archive", "Drafts", "Junk", "Sent", "Trash"]
    await account.setup()  # idempotent
    assert len(await account.mailboxes()) == 6


@pytest_twisted.ensureDeferred
async def test_create_makes_parents_and_refuses_duplicates(account):
    info = await account.create_mailbox("Projects/2026/Ünïcødé ✉")
    assert info.name == "Projects/2026/Ünïcødé ✉"
    assert {"Projects", "Projects/2026"} <= set(await names_of(account))
    with pytest.raises(MailboxExists):
        await account.create_mailbox("Projects/2026")
    with pytest.raises(MailboxExists):
        await account.create_mailbox("inbox")


@pytest.mark.parametrize("bad", ["", "/a", "a/", "a//b", "a*", "b%", "x\x00y", "tab\there"])
@pytest_twisted.ensureDeferred
async def test_invalid_names(account, bad):
    with pytest.raises(InvalidMailboxName):
        await account.create_mailbox(bad)


@pytest_twisted.ensureDeferred
async def test_inbox_is_case_insensitive_and_nfc(account):
    assert (await account.mailbox("iNbOx")).name == "INBOX"
    await account.create_mailbox("inbox/Sub")
    assert "INBOX/Sub" in await names_of(account)
    await account.create_mailbox("Cafe\u0301")  # decomposed é
    assert (await account.mailbox("Caf\u00e9")).name == "Caf\u00e9"


@pytest_twisted.ensureDeferred
async def test_delete_keeps_children(account):
    await account.create_mailbox("a/b/c")
    await account.delete_mailbox("a")
    assert [n for n in await names_of(account) if n.startswith("a")] == ["a/b", "a/b/c"]
    with pytest.raises(NoSuchMailbox):
        await account.mailbox("a")
    with pytest.raises(NoSuchMailbox):
        await account.delete_mailbox("a")
    with pytest.raises(CannotDeleteInbox):
        await account.delete_mailbox("inbox")


@pytest_twisted.ensureDeferred
async def test_rename_moves_children_and_keeps_uidvalidity(account):
    await account.create_mailbox("old/child/grandchild")
    before = {m.name: m.uidvalidity for m in await account.mailboxes()}
    await account.subscribe("old/child")
    await account.rename_mailbox("old", "new/place")
    after = {m.name: m.uidvalidity for m in await account.mailboxes()}
    assert "old" not in after and "old/child" not in after
    assert after["new/place"] == before["old"]
    assert after["new/place/child"] == before["old/child"]
    assert after["new/place/child/grandchild"] == before["old/child/grandchild"]
    assert "new" in after  # implied parent created
    assert "new/place/child" in await account.subscriptions()
    assert "old/child" not in await account.subscriptions()
    with pytest.raises(MailboxExists):
        await account.rename_mailbox("Sent", "Drafts")
    with pytest.raises(NoSuchMailbox):
        await account.rename_mailbox("nothing", "x")
    with pytest.raises(InvalidMailboxName):
        await account.rename_mailbox("new", "new/inside")


@pytest_twisted.ensureDeferred
async def test_recreated_mailbox_gets_a_new_uidvalidity(account):
    first = await account.create_mailbox("again")
    await account.delete_mailbox("again")
    second = await account.create_mailbox("again")
    assert second.uidvalidity > first.uidvalidity
    assert second.uidnext == 1


@pytest_twisted.ensureDeferred
async def test_uidvalidity_survives_restart(db_path, key):
    id_key = b"k" * 32
    store = Store.open(db_path, key, [MAIL], create=True)
    account = Account(store, id_key)
    await account.setup()
    before = {m.name: (m.id, m.uidvalidity) for m in await account.mailboxes()}
    account.close()
    await store.close()
    store = Store.open(db_path, key, [MAIL])
    account = Account(store, id_key)
    await account.setup()
    assert {m.name: (m.id, m.uidvalidity) for m in await account.mailboxes()} == before
    account.close()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_subscriptions_outlive_mailboxes(account):
    await account.create_mailbox("tmp")
    await account.subscribe("tmp")
    await account.delete_mailbox("tmp")
    assert "tmp" in await account.subscriptions()
    await account.unsubscribe("tmp")
    assert "tmp" not in await account.subscriptions()
    await account.unsubscribe("never")  # harmless


@pytest_twisted.ensureDeferred
async def test_init_creates_the_standard_mailboxes(tmp_path):
    from leapmail.home import Home

    home = Home(tmp_path / "acct")
    bundle = home.create("words", "me@example.org")
    store = home.open_store(bundle)
    account = Account(store, bundle.id_key)
    try:
        assert sorted(m.name for m in await account.mailboxes()) == [
            "Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"]
        assert await account.subscriptions() == ["Archive", "Drafts", "Junk", "Sent", "Trash"]
    finally:
        account.close()
        await store.close()
