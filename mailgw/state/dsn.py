"""PostgreSQL connection strings (DSNs) for the state store [11], never with a password.

A DSN is a URI (C{postgresql://mailgw@db1:5432/mailgw}) or libpq's C{key=value} pairs
(C{host=db1 user=mailgw dbname=mailgw}); libpq's own parser (through psycopg) reads
both, so what is accepted here is exactly what libpq will connect with.  A password in
the DSN is refused: configuration files are copied, shown and backed up, so the password
lives in C{[state] dsn_password_file} instead.  No message here quotes the DSN, which
might hold one.
"""

from __future__ import annotations

__all__ = ["PASSWORD_KEYS", "DSNError", "describe_dsn", "dsn_parameters"]

#: libpq parameters that carry a secret
PASSWORD_KEYS = ("password", "sslpassword")


class DSNError(ValueError):
    """A DSN that cannot be used; the message never contains the DSN."""


def dsn_parameters(dsn: str) -> dict[str, str]:
    """The libpq parameters of C{dsn}; L{DSNError} if it does not parse or holds a
    password."""
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise DSNError("needs the Python package psycopg: pip install 'psycopg[binary]'") from None
    try:
        parameters = conninfo_to_dict(dsn)
    except psycopg.Error:
        # libpq's message quotes the part it could not read: it might be a password.
        raise DSNError(
            'not a PostgreSQL connection string: use a URI ("postgresql://mailgw@db1/mailgw") '
            'or key=value pairs ("host=db1 user=mailgw dbname=mailgw")'
        ) from None
    for key in PASSWORD_KEYS:
        if key in parameters:
            raise DSNError(
                f"must not contain a password ({key} is set): put the password in the file "
                "named by state.dsn_password_file"
            )
    return {key: str(value) for key, value in parameters.items() if value is not None}


def describe_dsn(parameters: dict[str, str]) -> str:
    """C{user@host:port/dbname} for logs and messages (libpq's defaults left out)."""
    user = parameters.get("user")
    host = parameters.get("host") or parameters.get("hostaddr") or "(default host)"
    port = parameters.get("port")
    where = f"{user}@{host}" if user else host
    if port:
        where += f":{port}"
    database = parameters.get("dbname")
    return f"{where}/{database}" if database else where
