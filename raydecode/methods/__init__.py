"""One module per method, found by its file name: ``methods/<name>.py`` builds its model from :mod:`raydecode.nn`
parts and calls ``register(MethodSpec(name="<name>", ...))`` (:mod:`raydecode.methods.spec`); nothing else lists
methods. Methods do not import each other or anything about Ray (see DESIGN.md, "MethodSpec"). Other packages add
methods through the ``raydecode.methods`` entry-point group."""
