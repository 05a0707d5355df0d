"""Joining an account to its provider: the first device enrolls, others log in.

First device (``leapmail init --provider URL --provider-ca FILE --enroll CODE``): the
account's keys are made here, the secrets bundle sealed under the passphrase, and the
account claimed at the provider with the one-time code, handing it the sealed bundle
and a login verifier.  Only then is anything written locally, so a refused code leaves
nothing behind.

Other devices (``leapmail init --provider URL``, same passphrase): the login key is
derived from the passphrase with the parameters the provider keeps, the device logs in,
fetches the sealed bundle and opens it with the passphrase.  A wrong passphrase fails
at the login, before anything is written here or registered there.

The login key (scrypt under its own salt, then HKDF under its own label) is not the
key that seals the bundle: the provider sees it at every login and keeps its SHA-256,
and neither opens anything.  Its parameters (not secret) are kept in ``config.json``;
the daemon derives the key from the passphrase when it starts, so nothing stored
goes stale when the passphrase changes (:func:`change_passphrase`).
"""

import functools
import os
import socket
from hashlib import sha256

from twisted.internet import threads
from twisted.logger import Logger

from leapmail.crypto import ScryptParams, SecretsBundle, seal, unseal
from leapmail.crypto.kdf import UnsupportedKDF, derive_login_key
from leapmail.errors import LeapmailError
from leapmail.fsutil import atomic_write
from leapmail.sync.remote import ProviderClient, ProviderError, Unauthorized
from leapmail.sync.schema import set_state

CA_NAME = "provider-ca.pem"


class EnrollmentError(LeapmailError):
    pass


def add_incoming_keypair(bundle):
    """Give a new account the key pair its incoming mail is sealed to (private half
    in the bundle, under ``keypairs["incoming"]``); returns it."""
    from base64 import b64encode

    from leapmail.crypto.sealed import IncomingKeyPair

    keypair = IncomingKeyPair.generate()
    bundle.keypairs["incoming"] = b64encode(keypair.private_bytes()).decode("ascii")
    return keypair


def device_name():
    return f"{socket.gethostname()[:40]}-{os.urandom(3).hex()}"


def read_ca(path):
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise EnrollmentError(f"cannot read the provider certificate {path}: {e.strerror}"
                              ) from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise EnrollmentError(f"{path} holds no PEM certificate")
    return pem


async def enroll(home, passphrase, address, url, ca_pem, code, reactor=None):
    """Create the account here and claim it at the provider (first device)."""
    home.check_new()
    client = ProviderClient(url, ca_pem, reactor=reactor)
    try:
        bundle = SecretsBundle.generate()
        keypair = add_incoming_keypair(bundle)
        sealed = await threads.deferToThread(seal, bundle, passphrase)
        params = ScryptParams.fresh()
        login_key = await threads.deferToThread(derive_login_key, passphrase, params)
        name = device_name()
        try:
            token, device_id, _ = await client.enroll(
                address, code, params.to_dict(), sha256(login_key).digest(), sealed, name)
        except ProviderError as e:
            raise EnrollmentError(f"the provider did not accept the enrollment: {e}") from None
        client.token = token
        try:
            await client.put_incoming_key(keypair.public_bytes())
        except ProviderError as e:
            # Enrolled all the same: the daemon registers the key when it starts.
            Logger().warn("could not register the incoming-mail key yet: {error}", error=e)
    finally:
        await client.close()
    _create_local(home, address, sealed, bundle, url, ca_pem, token, device_id, name,
                  params, setup=True)
    return bundle


async def join(home, passphrase, address, url, ca_pem, reactor=None):
    """Set this device up for an account that exists at the provider."""
    home.check_new()
    client = ProviderClient(url, ca_pem, reactor=reactor)
    try:
        kdf = await client.login_params(address)
        try:
            params = ScryptParams.from_dict(kdf)
        except UnsupportedKDF as e:
            raise EnrollmentError(f"the provider's login parameters are unusable: {e}"
                                  ) from None
        login_key = await threads.deferToThread(derive_login_key, passphrase, params)
        name = device_name()
        try:
            token, device_id, _ = await client.login(address, login_key, name)
        except Unauthorized:
            raise EnrollmentError(
                f"the provider refused the login for {address}: wrong passphrase, or no "
                "such account there (nothing was changed)") from None
        client.token = token
        sealed = await client.bundle()
    finally:
        await client.close()
    bundle = await threads.deferToThread(unseal, sealed, passphrase, "the provider's bundle")
    _create_local(home, address, sealed, bundle, url, ca_pem, token, device_id, name,
                  params, setup=False)
    return bundle


async def change_passphrase(home, old, new, reactor=None):
    """Change the passphrase here and at the provider (which keeps the sealed bundle
    and the login verifier); nothing changes unless the provider accepts."""
    url, ca_pem = home.provider()
    bundle = home.unlock(old)
    config = home.config()
    try:
        old_params = ScryptParams.from_dict(config["login_kdf"])
    except (KeyError, TypeError, UnsupportedKDF):
        raise EnrollmentError(f"{home.config_path} lacks the login parameters; "
                              "this account cannot change its passphrase") from None
    new_params = ScryptParams.fresh()
    old_key = await threads.deferToThread(derive_login_key, old, old_params)
    new_key = await threads.deferToThread(derive_login_key, new, new_params)
    sealed = await threads.deferToThread(seal, bundle, new)
    client = ProviderClient(url, ca_pem, reactor=reactor)
    try:
        await client.change_passphrase(home.address(), old_key, new_params.to_dict(),
                                       sha256(new_key).digest(), sealed)
    except ProviderError as e:
        raise EnrollmentError(f"the passphrase is unchanged: {e}") from None
    finally:
        await client.close()
    home.write_secrets(sealed)
    home.write_config(dict(config, login_kdf=new_params.to_dict()))


def _create_local(home, address, sealed, bundle, url, ca_pem, token, device_id, name,
                  login_params, setup):
    config = {"address": address, "provider": url, "login_kdf": login_params.to_dict()}
    if ca_pem is not None:
        config["provider_ca"] = CA_NAME
    os.makedirs(home.path, mode=0o700, exist_ok=True)
    if ca_pem is not None:
        atomic_write(os.path.join(home.path, CA_NAME), ca_pem)
    home.write_config(config)
    database = home.create_store(bundle, sealed, setup=setup)
    try:
        database.run(functools.partial(
            _save_credentials, token=token, device_id=device_id, name=name))
    finally:
        database.close()


def _save_credentials(txn, token, device_id, name):
    set_state(txn, "token", token)
    set_state(txn, "device_id", device_id)
    set_state(txn, "device_name", name)
