from tests import interpreted

if interpreted.ENABLED:
    interpreted.install()
