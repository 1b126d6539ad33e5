"""Greengrass v2 packaging: ``components.build`` makes the deployable recipes and artifacts,
``components.validate`` checks them before they reach a device.

Run from the repository root as ``python -m components.build`` and
``python -m components.validate``. ``components/build.py`` also runs by path,
because the GDK's custom build command (``components/<Name>/gdk-config.json``)
starts it as ``python3 ../build.py`` from the component folder.
"""
