"""The one FAULT rule of services/device.py, checked on every mesh device class
without starting a server: each attribute and command a device declares
beyond MeshDevice's own has its own is-allowed hook that refuses in FAULT."""

from __future__ import annotations

import pytest

from services.device import FaultedComponent, MeshDevice
from test_mesh_files import server_classes

CLASSES = sorted({cls for classes in server_classes().values() for cls in classes.values()}, key=lambda c: c.__name__)
BASE_ATTRIBUTES = set(MeshDevice.TangoClassClass.attr_list)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_own_attribute_and_command_has_the_fault_hook(cls: type) -> None:
    tango_class = cls.TangoClassClass
    own_attributes = set(tango_class.attr_list) - BASE_ATTRIBUTES
    assert own_attributes or tango_class.cmd_list, "every mesh device has something of its own"
    for name in own_attributes:
        hook = getattr(cls, tango_class.attr_list[name].is_allowed_name)
        assert getattr(hook, "fault_rule", False), (cls.__name__, name)
    hooks = set()
    for name, info in tango_class.cmd_list.items():
        hook = getattr(cls, info[2]["Is allowed"])
        assert getattr(hook, "fault_rule", False), (cls.__name__, name)
        hooks.add(info[2]["Is allowed"])
    assert len(hooks) == len(tango_class.cmd_list), "one hook per command, none overwritten by another"
    for name in BASE_ATTRIBUTES:  # State, Status and the counters answer in FAULT
        hook = getattr(cls, tango_class.attr_list[name].is_allowed_name, None)
        assert not getattr(hook, "fault_rule", False), (cls.__name__, name)


class Refusal(Exception):
    pass


def test_the_faulted_component_refuses_what_the_failed_one_had_and_keeps_the_base() -> None:
    seen = []

    def refuse(what: str):
        seen.append(what)
        raise Refusal(what)

    component = FaultedComponent("test/x/1", refuse, "MaxUnitPoints must be positive (got 0)")
    assert component.counters.errors == 1
    assert component.counters.last_error == "start failed: MaxUnitPoints must be positive (got 0)"
    assert component.endpoints == {} and component.capabilities == {} and component.status() == ""
    component.stop()
    with pytest.raises(Refusal):
        component.dispatcher.workers
    with pytest.raises(Refusal):
        component.plan_scan("{}")
    assert seen == ["dispatcher", "plan_scan"]
    with pytest.raises(AttributeError):  # dunder probes (copy, pickle) are not device accesses
        component.__deepcopy__



def test_an_is_allowed_that_would_bypass_the_rule_is_refused_when_the_class_is_made() -> None:
    from tango.server import attribute

    with pytest.raises(TypeError, match="define is_Level_allowed instead of fisallowed"):
        class Bypass(MeshDevice):  # noqa: F841 - the class statement is the test
            @attribute(dtype=int, fisallowed=lambda self, request: True)
            def Level(self) -> int:
                return 1
