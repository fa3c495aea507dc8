from .sweep import *  # noqa: F401,F403 - the module became a package; split into submodules next
