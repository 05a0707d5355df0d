"""Passphrase → key, and the secrets bundle sealed under it."""

import hashlib
import json
import os
import unicodedata

import pytest
import pytest_twisted

from leapmail.crypto import (
    BundleCorrupted,
    ScryptParams,
    SecretsBundle,
    UnsupportedKDF,
    WrongPassphrase,
    seal,
    unseal,
)
from leapmail.crypto.kdf import SCRYPT_DEFAULTS, derive
from leapmail.home import Home

# Cheap parameters for tests that are not about the cost itself.
FAST = dict(n=2**10, r=8, p=1)


def test_defaults_are_stored_and_versioned():
    bundle = SecretsBundle.generate()
    sealed = json.loads(seal(bundle, "pw"))
    assert sealed["format"] == "leapmail-secrets" and sealed["version"] == 1
    kdf = sealed["kdf"]
    assert (kdf["name"], kdf["version"]) == ("scrypt", 1)
    assert (kdf["n"], kdf["r"], kdf["p"]) == (SCRYPT_DEFAULTS["n"], 8, 1) == (2**16, 8, 1)
    assert len(ScryptParams.from_dict(kdf).salt) == 16


def test_derivation_depends_on_every_parameter():
    params = ScryptParams.fresh(**FAST)
    base = derive("pw", params)
    assert len(base) == 32
    assert derive("pw", params) == base
    assert derive("pw2", params) != base
    assert derive("pw", ScryptParams(salt=os.urandom(16), **FAST)) != base
    assert derive("pw", ScryptParams(salt=params.salt, n=2**11, r=8, p=1)) != base


def test_passphrase_is_unicode_normalized():
    params = ScryptParams.fresh(**FAST)
    composed = "caf\u00e9 \u00fcber"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert derive(composed, params) == derive(decomposed, params)


def test_seal_unseal_round_trip_keeps_every_key():
    bundle = SecretsBundle.generate()
    bundle.keypairs["incoming"] = {"public": "cHVi", "private": "cHJpdg=="}
    opened = unseal(seal(bundle, "correct horse", ScryptParams.fresh(**FAST)), "correct horse")
    assert opened.storage_key == bundle.storage_key
    assert opened.id_key == bundle.id_key
    assert opened.storage_key != opened.id_key
    assert opened.keypairs == bundle.keypairs


def test_keys_never_show_in_repr():
    bundle = SecretsBundle.generate()
    text = repr(bundle) + str(bundle)
    assert bundle.storage_key.hex() not in text
    assert repr(bundle.storage_key) not in text


def test_wrong_passphrase_is_a_specific_error():
    sealed = seal(SecretsBundle.generate(), "right", ScryptParams.fresh(**FAST))
    with pytest.raises(WrongPassphrase) as err:
        unseal(sealed, "wrong", path="/x/secrets.json")
    assert str(err.value) == "wrong passphrase for /x/secrets.json"


def test_damaged_ciphertext_is_not_called_a_wrong_passphrase():
    sealed = json.loads(seal(SecretsBundle.generate(), "right", ScryptParams.fresh(**FAST)))
    raw = bytearray(__import__("base64").b64decode(sealed["ciphertext"]))
    raw[5] ^= 1
    sealed["ciphertext"] = __import__("base64").b64encode(bytes(raw)).decode()
    with pytest.raises(BundleCorrupted) as err:
        unseal(json.dumps(sealed).encode(), "right")
    assert "passphrase is right" in str(err.value)


def test_header_is_authenticated():
    sealed = json.loads(seal(SecretsBundle.generate(), "right", ScryptParams.fresh(**FAST)))
    sealed["format_note"] = "ignored extra field is fine"
    unseal(json.dumps(sealed).encode(), "right")
    sealed["kdf"]["p"] = 2  # a changed parameter changes the key: cannot go unnoticed
    with pytest.raises((WrongPassphrase, BundleCorrupted)):
        unseal(json.dumps(sealed).encode(), "right")


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda d: b"not json at all", BundleCorrupted),
        (lambda d: b"\xff\xfe\x00", BundleCorrupted),
        (lambda d: json.dumps({**d, "format": "other"}).encode(), BundleCorrupted),
        (lambda d: json.dumps({**d, "version": 2}).encode(), BundleCorrupted),
        (lambda d: json.dumps({**d, "kdf": {**d["kdf"], "version": 9}}).encode(), BundleCorrupted),
        (lambda d: json.dumps({**d, "kdf": {**d["kdf"], "n": 2**40}}).encode(), BundleCorrupted),
        (lambda d: json.dumps({k: v for k, v in d.items() if k != "nonce"}).encode(), BundleCorrupted),
    ],
    ids=["garbage", "binary", "format", "version", "kdf-version", "kdf-huge-n", "no-nonce"],
)
def test_malformed_bundles_are_refused_cleanly(mutate, error):
    d = json.loads(seal(SecretsBundle.generate(), "pw", ScryptParams.fresh(**FAST)))
    with pytest.raises(error) as err:
        unseal(mutate(d), "pw", path="/h/secrets.json")
    assert "/h/secrets.json" in str(err.value)


def test_scrypt_params_refuse_out_of_range_values():
    good = ScryptParams.fresh(**FAST).to_dict()
    for field, value in [("n", 3), ("n", 2**23), ("r", 0), ("p", 100), ("salt", "c2hvcnQ=")]:
        with pytest.raises(UnsupportedKDF):
            ScryptParams.from_dict({**good, field: value})


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest_twisted.ensureDeferred
async def test_home_wrong_passphrase_changes_nothing(tmp_path):
    home = Home(tmp_path / "acct")
    bundle = home.create("secret words", "me@example.org")
    store = home.open_store(bundle)
    await store.put("d", "note", b"kept")
    await store.close()
    before = {name: sha(os.path.join(home.path, name)) for name in os.listdir(home.path)}
    with pytest.raises(WrongPassphrase) as err:
        home.unlock("secret word")
    assert home.secrets_path in str(err.value)
    after = {name: sha(os.path.join(home.path, name)) for name in os.listdir(home.path)}
    assert after == before


@pytest_twisted.ensureDeferred
async def test_change_passphrase_reseals_without_touching_the_store(tmp_path):
    home = Home(tmp_path / "acct")
    bundle = home.create("old one", "me@example.org")
    store = home.open_store(bundle)
    await store.put_many([(f"d{i}", "note", os.urandom(500)) for i in range(200)])
    await store.close()
    store_before = sha(home.store_path)
    secrets_before = sha(home.secrets_path)

    home.change_passphrase("old one", "new one")
    assert sha(home.store_path) == store_before
    assert sha(home.secrets_path) != secrets_before
    with pytest.raises(WrongPassphrase):
        home.unlock("old one")
    reopened = home.unlock("new one")
    assert reopened.storage_key == bundle.storage_key
    store = home.open_store(reopened)
    assert len(await store.get_many([f"d{i}" for i in range(200)])) == 200
    await store.close()
    assert os.stat(home.secrets_path).st_mode & 0o777 == 0o600
    assert os.stat(home.path).st_mode & 0o777 == 0o700
    assert [n for n in os.listdir(home.path) if ".tmp" in n] == []


def test_change_passphrase_with_wrong_old_one_changes_nothing(tmp_path):
    home = Home(tmp_path / "acct")
    home.create("old one", "me@example.org")
    before = sha(home.secrets_path)
    with pytest.raises(WrongPassphrase):
        home.change_passphrase("not it", "new one")
    assert sha(home.secrets_path) == before
