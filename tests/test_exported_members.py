import middleware


def test_all_exports_exist_and_are_sorted() -> None:
    assert middleware.__all__ == sorted(middleware.__all__, key=lambda name: (not name.isupper(), name))
    for name in middleware.__all__:
        assert getattr(middleware, name) is not None, name
    public = {name for name in dir(middleware) if not name.startswith("_") and name[0].isupper()}
    assert public <= set(middleware.__all__) | {"UNLIMITED"}, public - set(middleware.__all__)
