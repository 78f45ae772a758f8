namespace AnyPrecML.Models;

/// <summary>
/// A model file or directory is malformed, truncated, inconsistent or of an unsupported kind.
/// The message names the file and the problem.
/// </summary>
public sealed class ModelFormatException : IOException
{
    /// <summary>Creates the exception with a message that names the file and the problem.</summary>
    public ModelFormatException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and the error that caused it.</summary>
    public ModelFormatException(string message, Exception inner) : base(message, inner) { }
}
