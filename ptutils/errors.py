"""Every error ptutils raises on purpose: one root, one subtree per subsystem."""

from __future__ import annotations


class PtutilsError(Exception):
    """Root of all ptutils errors."""


# --- configuration and registry -------------------------------------------------------
class ConfigError(PtutilsError):
    """A configuration is malformed: unknown key, bad value, unreadable file."""


class RegistryError(ConfigError):
    """A `type:` name is unknown or outside the allowlist."""


class BuildError(ConfigError):
    """A configuration is well-formed but building a Module from it failed."""


# --- state ----------------------------------------------------------------------------
class CodecError(PtutilsError):
    """A State blob is truncated, corrupt, foreign, or holds an unsupported value."""


class LoadError(PtutilsError):
    """Restoring a State into Modules failed (missing or mismatched entries)."""


# --- training -------------------------------------------------------------------------
class TrainingError(PtutilsError):
    """Training stopped for a reason the user must look at."""


class NanLossError(TrainingError):
    """The loss became NaN or infinite."""


class HiLossError(TrainingError):
    """The loss rose above the configured threshold."""


class DataError(PtutilsError):
    """A data source is missing, unreadable, or does not fit the network."""


# --- store ----------------------------------------------------------------------------
class StoreError(PtutilsError):
    """The store failed or holds something unexpected."""


class StoreUnavailable(StoreError):
    """The store's server could not be reached within the retry budget."""


class SessionNotFound(StoreError):
    """No session has this id or name."""


class SessionExists(StoreError):
    """A session with this name already exists."""


class CheckpointNotFound(StoreError):
    """No checkpoint matches the request."""


class CheckpointCorrupt(StoreError):
    """A stored checkpoint segment fails its checksum or cannot be decoded."""


# --- orchestration --------------------------------------------------------------------
class OrchestratorError(PtutilsError):
    """Submitting, scheduling or reconciling failed."""


class BrokerUnavailable(OrchestratorError):
    """The Celery broker could not be reached."""
