"""Teachers: any ASE calculator, loaded by name (registry), checked, and used to label stores."""

from kd_nnp.teachers.registry import Teacher, TeacherCheckError, TeacherImportError, load_teacher

__all__ = ["Teacher", "TeacherCheckError", "TeacherImportError", "load_teacher"]
