//! Enums written by name in records (`"reason": "exec"`, `"allocator": "glibc"`): serialized
//! through their `name()` and read back through their `parse()`, so that each name is spelled
//! in one place. A name that is not one of them is refused with the name shown escaped (it
//! comes from a file: it may hold anything a terminal would act on).

/// Implements `Serialize` and `Deserialize` for `$ty` by its `name()` and `parse()`; `$what`
/// names it in the error for an unknown name (`unknown snapshot reason 'x'`).
macro_rules! serde_by_name {
    ($ty:ty, $what:literal) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Name;
                impl serde::de::Visitor<'_> for Name {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str(concat!("a ", $what))
                    }
                    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<$ty, E> {
                        <$ty>::parse(name).ok_or_else(|| {
                            E::custom(format_args!(
                                concat!("unknown ", $what, " '{}'"),
                                crate::name::shown(name)
                            ))
                        })
                    }
                }
                d.deserialize_str(Name)
            }
        }
    };
}

pub(crate) use serde_by_name;
