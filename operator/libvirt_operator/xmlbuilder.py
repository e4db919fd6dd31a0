"""One declaration per modelled XML field, after virt-manager's virtinst XMLBuilder/XMLProperty.

A class of `XMLObject` declares its fields (`XMLProperty`: an attribute, an element's text or an
element's presence, by a path of child tags) and its lists of child objects (`XMLChildren`). The same
declaration renders (set the fields on a new element), reads back (get them) and rewrites a live
definition (`update_from`: each declared field copied in, every element and attribute nobody
declared left where it is).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Hashable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

from lxml import etree

O = TypeVar("O", bound="XMLObject")


def _find(root: etree._Element, path: tuple[str, ...]) -> etree._Element | None:
    element = root
    for tag in path:
        element = element.find(tag)
        if element is None:
            return None
    return element


_PREDICATE = re.compile(r"\[@([\w-]+)='([^']*)'\]")


def new_child(parent: etree._Element, step: str, order: tuple[str, ...] = ()) -> etree._Element:
    """A new `<tag>` in `parent` for a path step `tag` or `tag[@a='v']...` (its attributes set as the predicates
    say): before the first sibling that `order` puts after it, else last (libxml2, and so libvirt's validation,
    refuses some orders the schema's interleave should allow)."""
    tag = step.partition("[")[0]
    child = etree.Element(tag, dict(_PREDICATE.findall(step)))
    if tag in order:
        rank = order.index(tag)
        for index, sibling in enumerate(parent):
            if sibling.tag in order and order.index(sibling.tag) > rank:
                parent.insert(index, child)
                return child
    parent.append(child)
    return child


def _ensure(root: etree._Element, path: tuple[str, ...], order: tuple[str, ...] = ()) -> etree._Element:
    """The element at `path`, made where missing; `order` ranks the children of `root`."""
    element = root
    for depth, tag in enumerate(path):
        child = element.find(tag)
        element = child if child is not None else new_child(element, tag, order if depth == 0 else ())
    return element


def _prune(root: etree._Element, element: etree._Element | None) -> None:
    """Removes `element` and then its ancestors below `root` while they are left empty."""
    while element is not None and element is not root and not element.attrib and len(element) == 0 \
            and not (element.text or "").strip():
        parent = element.getparent()
        if parent is None:
            return
        parent.remove(element)
        element = parent


def _remove(root: etree._Element, path: tuple[str, ...]) -> None:
    parent = _find(root, path[:-1])
    if parent is None:
        return
    for element in parent.findall(path[-1]):
        parent.remove(element)
    _prune(root, parent)


class Field:
    """A modelled field of an `XMLObject`: read with `getattr`, written with `setattr`."""

    def read(self, element: etree._Element) -> Any:
        raise NotImplementedError

    def write(self, element: etree._Element, value: Any, order: tuple[str, ...]) -> None:
        raise NotImplementedError

    def __get__(self, obj: XMLObject | None, objtype: type | None = None) -> Any:
        return self if obj is None else self.read(obj.element)

    def __set__(self, obj: XMLObject, value: Any) -> None:
        self.write(obj.element, value, obj.order)


class XMLProperty(Field):
    """`path` is child tags joined by `/`, ending in `@name` for an attribute, else the element's text.

    `kind` is `str`, `int`, or `bool` for an element whose presence is the value (every element at
    `path` is removed for False). Setting None removes the attribute, or the whole text element, and
    then the parents it leaves empty. `owned`: the element is the operator's alone, rebuilt on every
    write (the attributes libvirt filled in, like `<nvram template=...>`, go with it).
    """

    def __init__(self, path: str, kind: type = str, *, owned: bool = False) -> None:
        tags, _, self.attribute = path.rpartition("@") if path.rpartition("/")[2].startswith("@") else (path, "", "")
        self.path = tuple(tag for tag in tags.split("/") if tag)
        self.kind = kind
        self.owned = owned

    def read(self, element: etree._Element) -> Any:
        found = _find(element, self.path)
        if self.kind is bool:
            return found is not None
        if found is None:
            return None
        raw = found.get(self.attribute) if self.attribute else found.text
        return None if raw is None else self.kind(raw)

    def write(self, element: etree._Element, value: Any, order: tuple[str, ...]) -> None:
        element_goes = not value if self.kind is bool else value is None and not self.attribute
        if element_goes:
            _remove(element, self.path)
        elif value is None:
            found = _find(element, self.path)
            if found is not None:
                found.attrib.pop(self.attribute, None)
                _prune(element, found)
        else:
            if self.owned:
                _remove(element, self.path)
            target = _ensure(element, self.path, order)
            if self.attribute:
                target.set(self.attribute, str(value))
            elif self.kind is not bool:
                target.text = str(value)


class XMLChildren(Generic[O]):
    """The child objects of one class under `parent` (child tags joined by `/`), matched across a rewrite by
    `item.key()`. A live child with no counterpart is dropped when `drop_unmatched` (the operator makes all
    of them), else kept (someone else may have added it)."""

    def __init__(self, item: type[O], parent: str = "", *, drop_unmatched: bool = True) -> None:
        self.item = item
        self.parent = tuple(tag for tag in parent.split("/") if tag)
        self.drop_unmatched = drop_unmatched

    def __get__(self, obj: XMLObject | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        parent = _find(obj.element, self.parent)
        return [] if parent is None else [self.item(child) for child in parent.iterfind(self.item.tag)]

    def append(self, obj: XMLObject, child: O) -> None:
        _ensure(obj.element, self.parent, obj.order).append(child.element)

    def update(self, live: XMLObject, wanted: XMLObject) -> None:
        wanted_by_key = {child.key(): child for child in self.__get__(wanted)}
        for child in self.__get__(live):
            counterpart = wanted_by_key.pop(child.key(), None)
            if counterpart is not None:
                child.update_from(counterpart)
            elif self.drop_unmatched:
                parent = child.element.getparent()
                parent.remove(child.element)
                _prune(live.element, parent)
        for child in wanted_by_key.values():
            self.append(live, type(child)(copy.deepcopy(child.element)))


class XMLObject:
    """One XML element and the fields the operator models in it."""

    tag: ClassVar[str]
    order: ClassVar[tuple[str, ...]] = ()
    """The order of this element's children, for the ones a write creates."""

    def __init__(self, element: etree._Element | None = None, **fields: Any) -> None:
        self.element = etree.Element(self.tag) if element is None else element
        for name, value in fields.items():
            if not isinstance(getattr(type(self), name, None), Field):
                raise AttributeError(f"{type(self).__name__} models no field {name}")
            setattr(self, name, value)

    @classmethod
    def from_xml(cls: type[O], xml: str) -> O:
        return cls(etree.fromstring(xml.encode(), parser=etree.XMLParser(resolve_entities=False, no_network=True)))

    @classmethod
    def _declared(cls, kind: type) -> Iterator[tuple[str, Any]]:
        seen: set[str] = set()
        for klass in cls.__mro__:
            for name, value in vars(klass).items():
                if isinstance(value, kind) and name not in seen:
                    seen.add(name)
                    yield name, value

    def key(self) -> Hashable:
        """What identifies this object among its siblings across a rewrite."""
        return (self.tag,)

    def add(self, child: XMLObject) -> None:
        """Appends `child` to the list this class declares for its type."""
        for _name, children in self._declared(XMLChildren):
            if children.item is type(child):
                children.append(self, child)
                return
        raise TypeError(f"{type(self).__name__} declares no list of {type(child).__name__}")

    def update_from(self, wanted: XMLObject) -> None:
        """Read-modify-write: every declared field of `wanted` written here, lists matched by key."""
        for name, _field in self._declared(Field):
            setattr(self, name, getattr(wanted, name))
        for _name, children in self._declared(XMLChildren):
            children.update(self, wanted)

    def to_xml(self) -> str:
        etree.indent(self.element, space="  ")
        return etree.tostring(self.element, pretty_print=True, encoding="unicode")

