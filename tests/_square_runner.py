"""A minimal sandbox runner for tests: ``f = <code>.f``; returns ``f(inputs['x'])`` (nothing but numpy)."""


def run(code, inputs, params):
    namespace = {}
    exec(compile(code, "<generated>", "exec"), namespace)
    return namespace["f"](inputs["x"])
