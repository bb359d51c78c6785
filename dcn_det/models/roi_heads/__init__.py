from .deform_roi_extractor import DeformRoIExtractor

__all__ = ['DeformRoIExtractor']
