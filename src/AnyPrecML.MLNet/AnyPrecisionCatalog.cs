using AnyPrecML.MLNet;

namespace Microsoft.ML;

/// <summary>AnyPrecML in the ML.NET transforms catalog.</summary>
public static class AnyPrecisionCatalog
{
    /// <summary>
    /// Quantizes an LLM once into an any-precision parent and serves every width from seed to parent: the fitted
    /// <see cref="AnyPrecisionTransformer"/> scores each row of <paramref name="inputColumnName"/> (LogLikelihood,
    /// TokenCount, Perplexity) at its <see cref="AnyPrecisionTransformer.Bits"/>.
    /// </summary>
    /// <param name="catalog">The transforms catalog.</param>
    /// <param name="modelPath">A llama2.c file or Hugging Face directory to quantize, or an any-precision directory.</param>
    /// <param name="inputColumnName">The text column: calibration text for Fit, the rows to score for Transform.</param>
    /// <param name="completionTokens">Tokens to generate into the Completion column (0: none).</param>
    /// <example>
    /// <code>
    /// var ml = new MLContext();
    /// var data = ml.Data.LoadFromTextFile&lt;Story&gt;("stories.txt");            // one text column "Text"
    /// var model = ml.Transforms.AnyPrecisionQuantize("stories260K.bin").Fit(data);
    /// model.Bits = 3;                                                            // the fast model
    /// var scored = model.Transform(data);                                        // adds LogLikelihood, TokenCount, Perplexity, Completion
    /// ml.Model.Save(model, data.Schema, "scorer.zip");
    /// </code>
    /// </example>
    public static AnyPrecisionEstimator AnyPrecisionQuantize(this TransformsCatalog catalog, string modelPath, string inputColumnName = "Text", int completionTokens = 0) =>
        catalog.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions { ModelPath = modelPath, InputColumnName = inputColumnName, CompletionTokens = completionTokens });

    /// <summary>
    /// Quantizes an LLM once into an any-precision parent with every setting given: widths, sensitivity, calibration,
    /// the initial Bits, generation and the engine. See <see cref="AnyPrecisionQuantizeOptions"/>.
    /// </summary>
    /// <param name="catalog">The transforms catalog.</param>
    /// <param name="options">The settings.</param>
    /// <example>
    /// <code>
    /// var estimator = ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions
    /// {
    ///     ModelPath = "stories260K.bin", InputColumnName = "Story", SeedBits = 3, ParentBits = 8,
    ///     Sensitivity = "fisher", CalibrationSamples = 32, Bits = 4, CompletionTokens = 32,
    ///     Progress = new Progress&lt;string&gt;(Console.WriteLine),
    /// });
    /// </code>
    /// </example>
    public static AnyPrecisionEstimator AnyPrecisionQuantize(this TransformsCatalog catalog, AnyPrecisionQuantizeOptions options)
    {
        ArgumentNullException.ThrowIfNull(catalog);
        // The inner CopyColumns/CustomMapping/DropColumns pipeline needs only a context of its own, not the caller's.
        return new AnyPrecisionEstimator(new MLContext(seed: 0), options);
    }
}
