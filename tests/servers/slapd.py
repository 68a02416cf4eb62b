"""A private OpenLDAP slapd 2.5 for integration tests.

::

    ldap = Slapd.started(self)                              # alice, bob, carol seeded
    ldap.add_user("dave", "dave-password", mail="dave@example.com", member_of=["mail"])
    connection = ldap.connection(tls=True)     # ldap3, bound as the service account, CA-verified

The instance runs ``slapd -d stats -h "ldap://HOST:PORT/ ldaps://HOST:PORT2/" -f
<base_dir>/slapd.conf`` in the foreground from a generated ``slapd.conf`` (the fastest
way to start: no ``cn=config`` folder to build with ``slapadd`` first; ``-d stats`` logs
every connection and operation, e.g. ``SRCH base=... filter="(uid=\\2A...)"``, to
:attr:`Slapd.log_path`).  It runs as the user running the tests (root or not: nothing
else is needed for ports above 1023 and files of its own); ``LDAPNOINIT`` keeps
``/etc/ldap/ldap.conf`` out of it.  Only the schema files of ``/etc/ldap/schema`` and
the modules of ``/usr/lib/ldap`` are read from the system.

- Listeners: ``ldap://`` (StartTLS offered, plain binds allowed) and ``ldaps://`` on
  free loopback ports; the certificate comes from a :class:`~tests.servers.pki.TestPKI`
  (``ca_path``); TLS 1.2 or later only.
- One ``mdb`` database for :attr:`Slapd.suffix` in ``<base_dir>/db`` (no fsync), with the
  suffix entry, ``ou=people`` (the users, :attr:`Slapd.base_dn`), ``ou=groups`` and
  ``ou=services``.
- Accounts: the root DN :attr:`Slapd.admin_dn` (seeding; ACLs do not apply to it) and
  the gateway's service account :attr:`Slapd.bind_dn` (``cn=mailgw,ou=services,...``),
  which may read (search) everything but passwords.  Users bind with their own password;
  ``userPassword`` is usable only for authentication (no one but the root DN reads it;
  a user may change their own).  Bound users may read the directory; anonymous clients
  only the root DSE and the schema.
- ``memberOf``: slapd's ``memberof`` overlay (Debian builds it).  Groups are
  ``groupOfNames`` under ``ou=groups`` whose ``member`` values are user DNs, and the
  overlay maintains the multi-valued operational ``memberOf`` of each member (group
  DNs) on every group change — so a search must ask for ``memberOf`` by name (or ``+``).
  :meth:`Slapd.add_user` with ``member_of`` adds the user to those groups (created when
  missing); :meth:`Slapd.add_group` creates a group or adds members to it.
- Passwords are stored ``{SSHA}``-hashed (slapd checks them itself).

Unless ``default_users=False``, the users of :data:`DEFAULT_LDAP_USERS` are seeded:
``alice`` (group ``mail``), ``bob`` (groups ``mail`` and ``finance``: several
``memberOf`` values) and ``carol`` (no group), all with ``mail`` ``<uid>@example.com``
(the suffix's domain).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.trial.unittest import SkipTest

from tests.servers.base import (
    LOOPBACK,
    MissingBinaryError,
    ServerProcess,
    ServerStartError,
    free_ports,
    require_binary,
    require_file,
)
from tests.servers.pki import TestPKI

if TYPE_CHECKING:
    import ldap3

__all__ = ["DEFAULT_LDAP_USERS", "LdapUser", "Slapd", "ssha"]

#: Where Debian keeps slapd's loadable modules and the schema files.
MODULE_DIRECTORIES = ("/usr/lib/ldap", "/usr/lib64/openldap", "/usr/libexec/openldap", "/usr/local/libexec/openldap")
SCHEMA_DIRECTORIES = ("/etc/ldap/schema", "/etc/openldap/schema", "/usr/local/etc/openldap/schema")
SCHEMAS = ("core", "cosine", "inetorgperson")


@dataclass(frozen=True)
class LdapUser:
    """A user seeded by default (see :meth:`Slapd.add_user` for the fields)."""

    uid: str
    password: str
    mail: str | None = None
    member_of: tuple[str, ...] = ()


#: Users seeded unless ``default_users=False``; ``{domain}`` is the suffix's domain.
DEFAULT_LDAP_USERS: Sequence[LdapUser] = (
    LdapUser("alice", "alice-password", "alice@{domain}", ("mail",)),
    LdapUser("bob", "bob-password", "bob@{domain}", ("mail", "finance")),
    LdapUser("carol", "carol-password", "carol@{domain}"),
)


def ssha(password: str, salt: bytes | None = None) -> str:
    """An RFC 2307 ``{SSHA}`` userPassword value (salted SHA-1), as slapd checks it."""
    salt = secrets.token_bytes(8) if salt is None else salt
    digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324 - the LDAP scheme
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def _require_ldap3() -> None:
    if importlib.util.find_spec("ldap3") is None:
        message = "the Python module ldap3 is not installed: .venv/bin/pip install ldap3"
        if os.environ.get("CI", "").lower() == "true":
            raise MissingBinaryError(message)
        raise SkipTest(message)


@functools.cache
def _uses_gnutls(binary: str) -> bool:
    """Whether slapd (through libldap) is built with GnuTLS, as Debian's is.

    Its TLS settings then take a GnuTLS priority string, and ``TLSProtocolMin`` does
    not keep TLS 1.0/1.1 out.
    """
    ldd = shutil.which("ldd")
    if ldd is None:
        return False
    result = subprocess.run([ldd, binary], capture_output=True, text=True, check=False, timeout=30)
    return "libgnutls" in result.stdout


def _conf_quote(value: str) -> str:
    if any(character in value for character in '"\\\r\n\0'):
        raise ValueError(f"cannot be written to slapd.conf: {value!r}")
    return f'"{value}"'


class Slapd(ServerProcess):
    """A private OpenLDAP slapd instance.

    Constructor: ``Slapd(base_dir=None, *, suffix="dc=example,dc=com", pki=None,
    host="127.0.0.1", bind_password="mailgw-service-password",
    admin_password="admin-password", default_users=True, debug="stats",
    extra_config="", startup_timeout=15.0, stop_timeout=5.0)``.  ``pki`` is a
    :class:`TestPKI` whose CA signs the server certificate (default: a new one in
    ``<base_dir>/pki``); ``extra_config`` is appended to the database section of
    ``slapd.conf``; ``debug`` is slapd's ``-d`` level.

    Attributes: ``host``, ``ldap_port``, ``ldaps_port``, ``suffix``, ``base_dn``
    (``ou=people``), ``groups_dn``, ``services_dn``, ``bind_dn``, ``bind_password``
    (the gateway's service account), ``admin_dn``, ``admin_password`` (the root DN),
    ``users`` (uid -> password of the users added), ``domain`` (``example.com`` for the
    default suffix), ``pki``, ``ca_path``, ``cert_path``, ``key_path``,
    ``config_path``, ``log_path``, ``base_dir``, ``pid``.  :meth:`url` gives the
    ``ldap://`` or ``ldaps://`` URL.
    """

    name: ClassVar[str] = "slapd"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        suffix: str = "dc=example,dc=com",
        pki: TestPKI | None = None,
        host: str = LOOPBACK,
        bind_password: str = "mailgw-service-password",  # noqa: S107 - a test fixture
        admin_password: str = "admin-password",  # noqa: S107 - a test fixture
        default_users: bool = True,
        debug: str = "stats",
        extra_config: str = "",
        startup_timeout: float = 15.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.ldap_port = self.ldaps_port = 0
        super().__init__(base_dir, host=host, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        from ldap3.utils.dn import parse_dn

        self.suffix = suffix
        suffix_rdns = parse_dn(suffix)
        self._suffix_rdn = suffix_rdns[0]
        if self._suffix_rdn[0].lower() not in ("dc", "o", "ou"):
            raise ValueError(f"suffix {suffix!r}: its first RDN must be dc=, o= or ou=")
        self.domain = ".".join(value for attribute, value, _ in suffix_rdns if attribute.lower() == "dc")
        self.base_dn = f"ou=people,{suffix}"
        self.groups_dn = f"ou=groups,{suffix}"
        self.services_dn = f"ou=services,{suffix}"
        self.bind_dn = f"cn=mailgw,{self.services_dn}"
        self.bind_password = bind_password
        self.admin_dn = f"cn=admin,{suffix}"
        self.admin_password = admin_password
        self.default_users = default_users
        self.debug = debug
        self.extra_config = extra_config
        self.users: dict[str, str] = {}
        self.config_path = self.base_dir / "slapd.conf"
        self.db_dir = self.base_dir / "db"
        self.pki = pki if pki is not None else TestPKI(self.base_dir / "pki")
        names = list(dict.fromkeys(["localhost", host]))
        self.cert_path, self.key_path = self.pki.server_cert(names, file_name=f"slapd-{self.ldap_port}")
        self.ca_path = self.pki.ca_path
        self._admin: ldap3.Connection | None = None

    # -- ServerProcess hooks -------------------------------------------------------------

    def check_requirements(self) -> None:
        self.slapd_binary = require_binary("slapd", "slapd")
        module = require_file([Path(d) / "back_mdb.la" for d in MODULE_DIRECTORIES], "slapd")
        self.module_directory = module.parent
        require_file([self.module_directory / "memberof.la"], "slapd")
        self.schema_directory = require_file(
            [Path(d) / "inetorgperson.schema" for d in SCHEMA_DIRECTORIES], "slapd"
        ).parent
        _require_ldap3()

    def allocate_ports(self) -> None:
        self.ldap_port, self.ldaps_port = free_ports(2, self.host)

    def listening_ports(self) -> dict[str, int]:
        # slapd listen()s only once the database is open: listening means ready.
        return {"ldap": self.ldap_port, "ldaps": self.ldaps_port}

    def prepare(self) -> None:
        self.db_dir.mkdir(exist_ok=True)
        self.config_path.write_text(self._config())

    def command(self) -> list[str]:
        listeners = f"ldap://{self.host}:{self.ldap_port}/ ldaps://{self.host}:{self.ldaps_port}/"
        return [self.slapd_binary, "-d", self.debug, "-h", listeners, "-f", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        return {**os.environ, "LDAPNOINIT": "1"}

    def after_start(self) -> None:
        from ldap3.core.exceptions import LDAPException

        try:
            self._admin = self.connection(self.admin_dn, self.admin_password)
            if not self._is_seeded():
                self._seed()
        except (LDAPException, RuntimeError) as error:
            raise ServerStartError(
                f"slapd: seeding failed: {error!r}; log {self.log_path}:\n{self.log_tail()}"
            ) from None

    def after_stop(self) -> None:
        if self._admin is not None:
            self._admin.unbind()
            self._admin = None

    # -- clients -------------------------------------------------------------------------

    def url(self, tls: bool = False) -> str:
        """``ldaps://host:ldaps_port`` with ``tls``, else ``ldap://host:ldap_port``."""
        if tls:
            return f"ldaps://{self.host}:{self.ldaps_port}"
        return f"ldap://{self.host}:{self.ldap_port}"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this instance's test CA."""
        return ssl.create_default_context(cafile=self.ca_path)

    def ldap3_tls(self) -> ldap3.Tls:
        """An ``ldap3.Tls`` that verifies the server against this instance's test CA."""
        import ldap3

        return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.ca_path, version=ssl.PROTOCOL_TLS_CLIENT)

    def connection(
        self,
        user: str | None = None,
        password: str | None = None,
        *,
        tls: bool = False,
        start_tls: bool = False,
        bind: bool = True,
    ) -> ldap3.Connection:
        """An ``ldap3`` connection (default: bound as the service account, plain LDAP).

        ``tls``: over ``ldaps://``; ``start_tls``: StartTLS before binding; both verify
        the certificate with the test CA.  With ``bind`` the bind must succeed
        (``LDAPBindError`` otherwise).
        """
        import ldap3

        server = ldap3.Server(
            self.host,
            port=self.ldaps_port if tls else self.ldap_port,
            use_ssl=tls,
            tls=self.ldap3_tls() if tls or start_tls else None,
            get_info=ldap3.NONE,
            connect_timeout=10,
        )
        if user is None:
            user, password = self.bind_dn, self.bind_password
        connection = ldap3.Connection(
            server,
            user=user,
            password=password,
            receive_timeout=10,
            raise_exceptions=False,
        )
        if bind:
            connection.open()
            if start_tls and not connection.start_tls():
                connection.unbind()
                raise ssl.SSLError(f"StartTLS failed: {connection.result}")
            if not connection.bind():
                result = connection.result
                connection.unbind()
                from ldap3.core.exceptions import LDAPBindError

                raise LDAPBindError(f"bind as {user!r} failed: {result}")
        return connection

    # -- directory entries ---------------------------------------------------------------

    def user_dn(self, uid: str) -> str:
        """The DN of user ``uid`` (the RDN escaped per RFC 4514)."""
        from ldap3.utils.dn import escape_rdn

        return f"uid={escape_rdn(uid)},{self.base_dn}"

    def group_dn(self, group: str) -> str:
        """The DN of a group given by ``cn`` (or ``group`` itself when it is a DN)."""
        from ldap3.utils.dn import escape_rdn

        if "=" in group:
            return group
        return f"cn={escape_rdn(group)},{self.groups_dn}"

    def add_user(
        self,
        uid: str,
        password: str,
        *,
        mail: str | None = None,
        cn: str | None = None,
        ou: str | None = None,
        o: str | None = None,
        member_of: Iterable[str] = (),
        attributes: Mapping[str, str | Sequence[str]] | None = None,
    ) -> str:
        """Add an ``inetOrgPerson`` ``uid=<uid>,ou=people,<suffix>``; returns its DN.

        ``userPassword`` is ``{SSHA}`` of ``password``; ``cn`` defaults to the uid and
        ``sn`` is its last word.  ``member_of``: groups (``cn`` under ``ou=groups`` or
        full DNs) the user is added to as a ``member`` (a missing group is created), so
        that the ``memberof`` overlay lists them in the user's ``memberOf``.
        ``attributes``: more attributes of the entry (e.g. ``employeeType``).
        """
        connection = self._admin_connection()
        dn = self.user_dn(uid)
        common_name = cn if cn is not None else uid
        entry: dict[str, Any] = {
            "uid": uid,
            "cn": common_name,
            "sn": common_name.split()[-1] if common_name.split() else common_name,
            "userPassword": ssha(password),
        }
        for attribute, value in (("mail", mail), ("ou", ou), ("o", o)):
            if value is not None:
                entry[attribute] = value
        for attribute, values in (attributes or {}).items():
            entry[attribute] = values if isinstance(values, str) else list(values)
        self._check(connection.add(dn, ["inetOrgPerson"], entry), connection, f"add {dn}")
        self.users[uid] = password
        for group in member_of:
            self.add_group(group, [dn])
        return dn

    def add_group(self, cn: str, members: Iterable[str]) -> str:
        """Create the ``groupOfNames`` ``cn`` (or DN) with ``members``, or add them to it.

        ``members``: user DNs, or uids of :attr:`base_dn` users.  At least one is needed
        (``groupOfNames`` requires a ``member``).  Returns the group DN.
        """
        import ldap3

        connection = self._admin_connection()
        dn = self.group_dn(cn)
        member_dns = [member if "=" in member else self.user_dn(member) for member in members]
        if not member_dns:
            raise ValueError("a groupOfNames needs at least one member")
        if connection.add(dn, ["groupOfNames"], {"member": member_dns}):
            return dn
        if connection.result["description"] != "entryAlreadyExists":
            self._check(False, connection, f"add {dn}")
        changes = {"member": [(ldap3.MODIFY_ADD, member_dns)]}
        self._check(connection.modify(dn, changes), connection, f"add members to {dn}")
        return dn

    def member_of(self, uid: str) -> list[str]:
        """The ``memberOf`` values of user ``uid`` (read as the root DN)."""
        connection = self._admin_connection()
        ok = connection.search(self.user_dn(uid), "(objectClass=*)", search_scope="BASE", attributes=["memberOf"])
        self._check(ok, connection, f"read memberOf of {uid}")
        values: list[str] = connection.entries[0].entry_attributes_as_dict.get("memberOf", [])
        return sorted(values)

    # -- internals -----------------------------------------------------------------------

    def _admin_connection(self) -> ldap3.Connection:
        if self._admin is None:
            raise RuntimeError("slapd is not running: start it before adding entries")
        return self._admin

    @staticmethod
    def _check(ok: bool, connection: ldap3.Connection, what: str) -> None:
        if not ok:
            raise RuntimeError(f"slapd: {what} failed: {connection.result}")

    def _is_seeded(self) -> bool:
        connection = self._admin_connection()
        return bool(connection.search(self.suffix, "(objectClass=*)", search_scope="BASE"))

    def _seed(self) -> None:
        connection = self._admin_connection()
        attribute, value, _ = self._suffix_rdn
        if attribute.lower() == "dc":
            classes, suffix_entry = ["dcObject", "organization"], {"dc": value, "o": value}
        elif attribute.lower() == "o":
            classes, suffix_entry = ["organization"], {"o": value}
        else:
            classes, suffix_entry = ["organizationalUnit"], {"ou": value}
        self._check(connection.add(self.suffix, classes, suffix_entry), connection, f"add {self.suffix}")
        for dn in (self.base_dn, self.groups_dn, self.services_dn):
            self._check(connection.add(dn, ["organizationalUnit"]), connection, f"add {dn}")
        service = {"cn": "mailgw", "userPassword": ssha(self.bind_password), "description": "mailgw gateway"}
        self._check(
            connection.add(self.bind_dn, ["applicationProcess", "simpleSecurityObject"], service),
            connection,
            f"add {self.bind_dn}",
        )
        if self.default_users:
            for user in DEFAULT_LDAP_USERS:
                mail = user.mail.format(domain=self.domain or "example.com") if user.mail else None
                self.add_user(user.uid, user.password, mail=mail, member_of=user.member_of)

    def _config(self) -> str:
        lines = [
            "# Generated by tests/servers/slapd.py for one test instance.",
            *(f"include {self.schema_directory / f'{schema}.schema'}" for schema in SCHEMAS),
            f"pidfile {self.base_dir / 'slapd.pid'}",
            f"argsfile {self.base_dir / 'slapd.args'}",
            f"modulepath {self.module_directory}",
            "moduleload back_mdb",
            "moduleload memberof",
            f"TLSCACertificateFile {self.ca_path}",
            f"TLSCertificateFile {self.cert_path}",
            f"TLSCertificateKeyFile {self.key_path}",
            "TLSProtocolMin 3.3",  # TLS 1.2 (OpenSSL builds; GnuTLS builds ignore it)
            *(["TLSCipherSuite NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"] if _uses_gnutls(self.slapd_binary) else []),
            "TLSVerifyClient never",
            "",
            "database mdb",
            f"suffix {_conf_quote(self.suffix)}",
            f"rootdn {_conf_quote(self.admin_dn)}",
            f"rootpw {_conf_quote(self.admin_password)}",
            f"directory {self.db_dir}",
            "maxsize 104857600",
            "dbnosync",
            "index objectClass,uid,cn,mail,member eq",
            "",
            'access to dn.base="" by * read',
            'access to dn.base="cn=Subschema" by * read',
            "access to attrs=userPassword",
            "    by self =xw",  # auth and change, not read
            "    by anonymous auth",
            "    by * none",
            "access to *",
            f"    by dn.exact={_conf_quote(self.bind_dn)} read",
            "    by self read",
            "    by users read",
            "    by * none",
            "",
            "overlay memberof",
            "memberof-refint true",
        ]
        if self.extra_config:
            lines += ["# extra_config", self.extra_config]
        return "\n".join(lines) + "\n"
