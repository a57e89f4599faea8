"""`DSAGE_HOME` and the server's configuration file (INI), read into a frozen dataclass."""
from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import os
import re
from pathlib import Path


def home() -> Path:
    """The dsage home folder: `$DSAGE_HOME`, else ``~/.dsage``."""
    return Path(os.environ.get("DSAGE_HOME") or "~/.dsage").expanduser()


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `dsage_server` needs to run."""

    home: Path
    host: str = "localhost"
    interface: str = "127.0.0.1"
    port: int = 8081
    web_port: int = 8082
    web_interface: str = "127.0.0.1"
    db: str = ""
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    log_file: str = ""
    max_queued_per_user: int = 1_000_000
    max_connections: int = 5_000
    keep_days: float = 30.0
    pack_growth: float = 2.0
    pack_min_mb: float = 64.0
    maintenance_seconds: float = 600.0
    index_seconds: float = 30.0
    hold_seconds: float = 30.0

    @property
    def db_uri(self) -> str:
        """The storage URI (zodburi); the FileStorage in `home` unless configured."""
        if self.db:
            return self.db
        db_dir = self.home / "db"
        return f"file://{db_dir / 'dsage.fs'}?blobstorage_dir={db_dir / 'blobs'}"

    def save(self, path: Path) -> None:
        """Write this configuration as an INI file."""
        parser = configparser.ConfigParser(interpolation=None)
        parser["server"] = {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)
                            if f.name != "home"}
        with open(path, "w") as fh:
            fh.write("# dsage server configuration; command-line flags override it.\n")
            parser.write(fh)


def load_server_config(path: Path | None = None, dsage_home: Path | None = None) -> ServerConfig:
    """Read `server.conf` (ValueError with the offending key when something is wrong)."""
    dsage_home = dsage_home or home()
    path = Path(path) if path else dsage_home / "server.conf"
    if not path.exists():
        raise ValueError(f"no server configuration at {path}: run `dsage init` first")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error as e:
        raise ValueError(f"{path} is not a configuration file of [sections] and key = value lines: "
                         f"{e.message.splitlines()[0]}") from None
    if "server" not in parser:
        raise ValueError(f"{path} has no [server] section")
    values: dict[str, object] = {}
    types = {f.name: f.type for f in dataclasses.fields(ServerConfig)}
    for key, raw in parser["server"].items():
        if key not in types or key == "home":
            raise ValueError(f"{path}: unknown setting {key!r}")
        kind = types[key]
        try:
            values[key] = int(raw) if kind == "int" else float(raw) if kind == "float" else raw
        except ValueError:
            raise ValueError(f"{path}: {key} must be a number, not {raw!r}") from None
    return ServerConfig(home=dsage_home, **values)


def masked(uri: str) -> str:
    """A storage URI as logs and messages show it: its password, if any, as ***."""
    scheme, sep, rest = uri.partition("://")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")         # the host follows the last @
    if not sep or not at or ":" not in userinfo:
        return uri
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{rest[end:]}"


def split_address(address: str, default_port: int = 8081) -> tuple[str, int]:
    """'host:port' -> (host, port); ValueError with a clear message when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad server address {address!r}: expected HOST:PORT") from None
    if not 0 <= number < 65536:
        raise ValueError(f"bad server address {address!r}: the port must be from 1 to 65535")
    return host.strip("[]"), number


#: a host name: labels of letters, digits, underscores and inner hyphens.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def check_server_config(config: ServerConfig, keys: bool = True) -> None:
    """Refuse, with ValueError saying why, a configuration the server cannot start with (and
    with `keys`, a home without the keys `dsage init` makes)."""
    try:
        ipaddress.ip_address(config.host)
    except ValueError:
        if len(config.host) > 253 or not _HOST_NAME.fullmatch(config.host):
            raise ValueError(f"the host {config.host!r} is neither a host name nor an IP address") from None
    if not 0 <= config.port <= 65535:
        raise ValueError(f"the port must be from 0 (any free port) to 65535, not {config.port}")
    if not -1 <= config.web_port <= 65535:
        raise ValueError(f"the web port must be from -1 (no dashboard) to 65535, not {config.web_port}")
    if not config.hold_seconds > 0:
        raise ValueError(f"hold_seconds must be more than 0, not {config.hold_seconds:g}")
    for name in ("ca.pem", "server.pem", "server.key") if keys else ():
        if not (config.home / name).exists():
            raise ValueError(f"{config.home / name} is missing: run `dsage init`")
