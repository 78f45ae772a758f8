// One model, every width: quantize stories260K once into an 8-bit parent, then serve 3..8 bits
// from it, showing the story and the perplexity each width gives.
//   dotnet run samples/AnyPrecisionTour.cs            (the shared models beside the repository, or $ANYPREC_SHARED)
#:project ../src/AnyPrecML/AnyPrecML.csproj
#:property PublishAot=false

using AnyPrecML.Evaluation;
using AnyPrecML.Generation;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;

// Paths are relative to this file, wherever it is run from (.NET 10 gives a file-based app its own path).
string here = (string)AppContext.GetData("EntryPointFileDirectoryPath")!;
string shared = Environment.GetEnvironmentVariable("ANYPREC_SHARED") ?? Path.Combine(here, "..", "..", "shared");
string modelPath = Path.Combine(shared, "models", "stories260K", "stories260K.bin");
string text = Path.Combine(shared, "data", "tinystories", "valid-sample.txt");
// A folder of this run's own, so two runs never write over each other; removed at the end.
string output = Directory.CreateTempSubdirectory("stories260K-anyprec-").FullName;
try
{
    using (var source = LlamaCheckpoint.Open(modelPath))
    {
        var tokenizer = LlamaTokenizerLoader.Load(source);
        // Sensitivity: mean squared activations over the first six stories.
        var calibration = CalibrationSet.FromText(tokenizer, string.Join('\n', File.ReadLines(text).Take(6)), samples: 100, sequenceLength: 512, source.Config.MaxSeqLen, "first six stories");
        var (sensitivity, summary) = SensitivitySources.Create("hessian", ReferenceEngine.FromCheckpoint(source), calibration);
        AnyPrecisionQuantizer.Quantize(source, output, sensitivity, new QuantizerOptions { SeedBits = 3, ParentBits = 8 }, summary, overwrite: true);
    }

    using var model = AnyPrecisionModel.Open(output);
    var tok = LlamaTokenizerLoader.Load(model.Checkpoint);
    var heldOut = PerplexityEvaluator.Tokenize(tok, string.Join('\n', File.ReadLines(text).Skip(6)), bosPerLine: true);
    Console.WriteLine($"{output}: one parent serving {string.Join(", ", model.SupportedBits)} bits\n");
    // One ONNX Runtime session serves every width: the bitplane operator reads the top `bits` planes of the
    // one mapped parent, chosen per call.
    using var engine = new OnnxEngine(model);
    foreach (int bits in model.SupportedBits)
    {
        engine.Bits = bits;
        var story = new TextGenerator(engine, tok).Generate("Once upon a time", new GenerationOptions { MaxTokens = 40 });
        var ppl = PerplexityEvaluator.Evaluate(engine, heldOut);
        Console.WriteLine($"{bits} bits  perplexity {ppl.Perplexity,6:F3}  Once upon a time{story.Text.ReplaceLineEndings(" ")}");
    }
}
finally
{
    Directory.Delete(output, recursive: true);
}
