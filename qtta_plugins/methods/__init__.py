"""Built-in methods. Each module is a plugin the core registers exactly as a third party's would be."""

BUILTIN_METHOD_PLUGINS = (
    "qtta_plugins.methods.source",
    "qtta_plugins.methods.norm",
    "qtta_plugins.methods.tent",
    "qtta_plugins.methods.cotta",
    "qtta_plugins.methods.rotta",
    "qtta_plugins.methods.eata",
    "qtta_plugins.methods.sar",
    "qtta_plugins.methods.zoa",
    "qtta_plugins.methods.foa",
    "qtta_plugins.methods.ttaq",
    "qtta_plugins.methods.rtfq",
)
