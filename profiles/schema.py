"""Validated, frozen model of an organ profile (``profiles/*.yaml``)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from segnode.yamlconf import Frozen


class Backend(str, Enum):
    """The segmentation backends a profile can name."""

    HU_BASED = "hu_based"
    TOTALSEGMENTATOR = "totalsegmentator"
    NNUNET = "nnunet"
    MONAI = "monai"


#: the backends whose models are imported by name and fine-tuned in versions (``NAME/VERSION``, models/weights.py)
VERSIONED = (Backend.NNUNET, Backend.MONAI)


class Code(Frozen):
    """A coded concept (SNOMED CT by default), as written into the SEG."""

    scheme: str = "SCT"
    value: Annotated[str, Field(min_length=1, max_length=64)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


Colour = tuple[
    Annotated[int, Field(ge=0, le=255)],
    Annotated[int, Field(ge=0, le=255)],
    Annotated[int, Field(ge=0, le=255)],
]


class Tissue(Frozen):
    """One segment of a profile, with its codes and per-backend options."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
    description: str
    color: Colour
    category: Code | None = None
    type: Code | None = None
    modifier: Code | None = Field(
        default=None, description="laterality modifier of the type (e.g. SCT 7771000 Left)"
    )
    anatomic_region: Code | None = None
    codes_from: str | None = Field(
        default=None,
        description="TotalSegmentator structure whose SNOMED codes fill missing codes",
    )
    hu_range: tuple[float, float] | None = None
    totalsegmentator: tuple[str, ...] = ()
    label: Annotated[int, Field(ge=1, le=255)] | None = None

    @field_validator("hu_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] >= value[1]:
            raise ValueError(f"hu_range low {value[0]} must be below high {value[1]}")
        return value


class TotalSegmentatorOptions(Frozen):
    task: str = "total"
    resolution: Annotated[str, Field(pattern=r"^(normal|fast|fastest)$")] = "fast"
    roi_subset: tuple[str, ...] | None = None


class NnunetOptions(Frozen):
    model: str | None = Field(default=None, description="imported model name (segnode models list)")
    folds: tuple[int | str, ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    tile_step_size: Annotated[float, Field(gt=0, le=1)] = 0.5
    use_mirroring: bool = True
    orientation: Annotated[str, Field(pattern=r"^(native|ras)$")] = Field(
        default="native", description="voxel order the model was trained on: native (DICOM) or ras (canonical)"
    )


class MonaiOptions(Frozen):
    model: str | None = Field(default=None, description="imported model name (segnode models list)")
    target_spacing: tuple[float, float, float] | None = Field(
        default=None, description="x, y, z mm the network expects; None: the volume's own"
    )
    roi_size: tuple[int, int, int] = (96, 96, 96)
    sw_batch_size: Annotated[int, Field(ge=1)] = 1
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.25
    hu_window: tuple[float, float] = (-1000.0, 1000.0)


class HuBasedOptions(Frozen):
    method: Annotated[str, Field(pattern=r"^(brain|lungs|bone)$")]


class BackendOptions(Frozen):
    hu_based: HuBasedOptions | None = None
    totalsegmentator: TotalSegmentatorOptions = TotalSegmentatorOptions()
    nnunet: NnunetOptions = NnunetOptions()
    monai: MonaiOptions = MonaiOptions()


class Side(str, Enum):
    """The patient's side a lateral organ's centroid must lie on (LPS: +x is left)."""

    LEFT = "left"
    RIGHT = "right"


Range = tuple[float, float]


def _check_range(value: Range | None, what: str) -> Range | None:
    if value is not None and not 0 <= value[0] < value[1]:
        raise ValueError(f"{what} {list(value)} must be 0 <= low < high")
    return value


class TissueQC(Frozen):
    """Quality checks of one tissue's result (see models/qc.py); every check is optional."""

    volume_ml: Range | None = Field(default=None, description="expected volume; outside: warn")
    volume_fail_ml: Range | None = Field(default=None, description="plausible volume; outside: fail")
    side: Side | None = Field(
        default=None, description="centroid on the patient's left or right of the body's midline; wrong: fail"
    )
    max_components: Annotated[int, Field(ge=1)] | None = Field(default=None, description="more: warn")
    min_component_ml: Annotated[float, Field(ge=0)] = Field(default=1.0, description="smaller ones not counted")
    min_largest_share: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="the largest component's share of the tissue's volume; less: warn (scattered result)"
    )
    max_edge_fraction: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None,
        description="share of the tissue's voxels on the volume's faces (organ cut by the field of view); "
        "more: warn; 0: any voxel on a face warns",
    )
    allow_empty: bool = Field(default=False, description="an empty segment passes instead of failing")

    @model_validator(mode="after")
    def _ranges(self) -> "TissueQC":
        _check_range(self.volume_ml, "volume_ml")
        _check_range(self.volume_fail_ml, "volume_fail_ml")
        if self.volume_ml and self.volume_fail_ml:
            inner, outer = self.volume_ml, self.volume_fail_ml
            if not outer[0] <= inner[0] < inner[1] <= outer[1]:
                raise ValueError(f"volume_ml {list(inner)} must lie inside volume_fail_ml {list(outer)}")
        return self


class ProfileQC(Frozen):
    """The ``qc:`` section of a profile: per-tissue checks and fallback agreement."""

    tissues: dict[str, TissueQC] = {}
    min_agreement_dice: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="Dice between primary and fallback results when both ran; below: warn"
    )
    cross_check: Backend | None = Field(
        default=None, description="a second backend run on every result to measure agreement (costs its run time)"
    )

    @model_validator(mode="after")
    def _cross_check_needs_a_minimum(self) -> "ProfileQC":
        if self.cross_check is not None and self.min_agreement_dice is None:
            raise ValueError("qc.cross_check needs qc.min_agreement_dice (the Dice below which it warns)")
        return self


class Profile(Frozen):
    """An organ profile: what to segment, how, and how to code it in the SEG."""

    organ: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    description: str
    model_type: Backend
    model_checkpoint: str | None = None
    fallback: tuple[Backend, ...] = ()
    tissues: Annotated[tuple[Tissue, ...], Field(min_length=1)]
    options: BackendOptions = BackendOptions()
    qc: ProfileQC = ProfileQC()

    @model_validator(mode="after")
    def _consistent(self) -> "Profile":
        names = [t.name for t in self.tissues]
        if len(set(names)) != len(names):
            raise ValueError(f"tissue names must be unique, got {names}")
        unknown = sorted(set(self.qc.tissues) - set(names))
        if unknown:
            raise ValueError(f"qc names tissues {unknown} that the profile does not have")
        for tissue in self.tissues:
            if tissue.category is None or tissue.type is None:
                raise ValueError(
                    f"tissue {tissue.name!r} has no SNOMED category/type codes "
                    "(give 'category' and 'type', or 'codes_from')"
                )
        uses = {self.model_type, *self.fallback}
        if Backend.HU_BASED in uses and self.options.hu_based is None:
            raise ValueError("hu_based is used but options.hu_based.method is missing")
        if Backend.TOTALSEGMENTATOR in uses:
            missing = [t.name for t in self.tissues if not t.totalsegmentator]
            if missing:
                raise ValueError(f"totalsegmentator is used but tissues {missing} name no classes")
        if uses & {Backend.NNUNET, Backend.MONAI}:
            missing = [t.name for t in self.tissues if t.label is None]
            if missing:
                raise ValueError(f"nnunet/monai are used but tissues {missing} have no 'label'")
        if self.model_type in self.fallback:
            raise ValueError("fallback must not repeat model_type")
        return self

    def label_values(self) -> dict[int, str]:
        """Segment number (1..N, profile order) → tissue name."""
        return {i: t.name for i, t in enumerate(self.tissues, start=1)}

    def tissue(self, name: str) -> Tissue:
        return next(t for t in self.tissues if t.name == name)
